//! The two learned pieces of boundless DAS and the interchange that uses them: an orthogonal [`Rotation`] of the
//! hidden space (a Cayley transform of a trainable skew-symmetric matrix, times a fixed orthogonal start), a
//! [`Boundary`] that says how many of the rotated dimensions are swapped (a soft sigmoid mask while training, a hard
//! one to evaluate), and [`interchange`], the formula itself.

use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

fn torch(what: &'static str) -> impl Fn(tch::TchError) -> Error {
    move |e| Error::torch(what, e)
}

fn invalid(message: String) -> Error {
    Error::InvalidInput { message: format!("das: {message}") }
}

/// An orthogonal matrix `R = B · (I − S)⁻¹ (I + S)`, `[dim, dim]`, with `S = P − Pᵀ` skew-symmetric and `P` the
/// trainable parameter (zero at the start, so `R` starts at the fixed orthogonal `B`).
///
/// The Cayley transform maps every skew-symmetric `S` to an orthogonal matrix (`I − S` is always invertible), so
/// `R` stays orthogonal whatever an optimizer does to `P`: this is `torch.nn.utils.parametrizations.orthogonal`
/// with `orthogonal_map="cayley"` and a fixed base, the parametrization pyvene's `RotateLayer` trains (pyvene's
/// default map is the matrix exponential; the Cayley map needs one linear solve instead of a dozen products of
/// `[dim, dim]` matrices and its backward is as cheap). It is computed in float64 and handed out in float32, so
/// `R Rᵀ = I` within about 1e-6.
///
/// Rows of a hidden state are rotated as `h R` (`R`'s columns are the new basis, as pyvene's `RotateLayer`
/// computes `x @ weight`) and rotated back with `Rᵀ`.
#[derive(Debug)]
pub struct Rotation {
    base: Tensor,
    param: Tensor,
}

impl Rotation {
    /// A random orthogonal start (the Q of a QR decomposition of a Gaussian matrix, with the signs that make it
    /// uniformly distributed) drawn from a seeded generator of this module, so a seed repeats exactly and
    /// libtorch's global generator is left alone.
    pub fn random(dim: i64, seed: u64) -> Result<Self> {
        if dim < 1 {
            return Err(invalid(format!("a rotation needs a dimension of at least 1, given {dim}")));
        }
        let mut rng = Rng::new(seed);
        let values: Vec<f64> = (0..dim * dim).map(|_| rng.normal()).collect();
        let gaussian = Tensor::from_slice(&values).view([dim, dim]);
        let (q, r) = Tensor::f_linalg_qr(&gaussian, "reduced").map_err(torch("das rotation (QR)"))?;
        // Multiply each column by the sign of R's diagonal: Haar-distributed (Mezzadri 2007).
        let signs = r.diagonal(0, 0, 1).sign();
        let signs = signs.where_self(&signs.ne(0.0), &signs.ones_like());
        Self::with_base(&(q * signs.unsqueeze(0)))
    }

    /// A rotation that starts at `matrix`, a `[dim, dim]` orthogonal matrix (checked: `R Rᵀ = I` within 1e-4).
    pub fn from_matrix(matrix: &Tensor) -> Result<Self> {
        let size = matrix.size();
        if size.len() != 2 || size[0] != size[1] || size[0] < 1 {
            return Err(invalid(format!("a rotation must be a square [dim, dim] matrix, given shape {size:?}")));
        }
        let m = matrix.to_device(Device::Cpu).to_kind(Kind::Double).detach();
        let err = (m.matmul(&m.tr()) - Tensor::eye(size[0], (Kind::Double, Device::Cpu))).abs().max().double_value(&[]);
        if err.is_nan() || err > 1e-4 {
            return Err(invalid(format!("a rotation must be orthogonal: R Rᵀ differs from I by up to {err:.3e}")));
        }
        Self::with_base(&m)
    }

    fn with_base(base: &Tensor) -> Result<Self> {
        let dim = base.size()[0];
        let param = Tensor::zeros([dim, dim], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        Ok(Rotation { base: base.to_kind(Kind::Double).detach(), param })
    }

    /// The size of the space it rotates.
    pub fn dim(&self) -> i64 {
        self.base.size()[0]
    }

    /// The trainable parameter `P` (`[dim, dim]`, float32, on the CPU, requires grad): give it to an optimizer.
    pub fn parameter(&self) -> &Tensor {
        &self.param
    }

    /// `R`, `[dim, dim]` float32 on the CPU, differentiable with respect to [`Rotation::parameter`].
    pub fn matrix(&self) -> Result<Tensor> {
        let p = self.param.to_kind(Kind::Double);
        let skew = &p - p.tr();
        let eye = Tensor::eye(self.dim(), (Kind::Double, Device::Cpu));
        let cayley =
            Tensor::f_linalg_solve(&(&eye - &skew), &(&eye + &skew), true).map_err(torch("das rotation (Cayley)"))?;
        Ok(self.base.matmul(&cayley).to_kind(Kind::Float))
    }

    /// `R` without gradient history.
    pub fn detached(&self) -> Result<Tensor> {
        Ok(tch::no_grad(|| self.matrix())?.detach())
    }
}

/// Which rotated dimensions an interchange swaps: the first `size` of them, `size = clamp(fraction, 0, 1) · dim`
/// with `fraction` trainable (pyvene's `intervention_boundaries`).
///
/// While training the mask is soft, `mask_i = σ((size − i − ½) / T)` for `i = 0..dim`: near 1 below the boundary,
/// near 0 above, with a temperature `T` that is annealed towards 0 so that it hardens, and a gradient for `size`
/// at every step. (pyvene multiplies in a second factor, `σ(i / T)`, which only halves dimension 0; it is left out
/// here.) [`Boundary::hard_mask`] is its limit as `T → 0`: 1 for the first `round(size)` dimensions, 0 after;
/// evaluation uses it, so the subspace reported is exactly the one swapped.
#[derive(Debug)]
pub struct Boundary {
    fraction: Tensor,
    dim: i64,
}

impl Boundary {
    /// A boundary after `size` of `dim` dimensions (`0 ≤ size ≤ dim`; it need not be whole).
    pub fn new(dim: i64, size: f64) -> Result<Self> {
        if dim < 1 || !(0.0..=dim as f64).contains(&size) {
            return Err(invalid(format!(
                "a boundary needs 0 <= size <= dim and dim >= 1, given size {size} of dim {dim}"
            )));
        }
        let fraction = Tensor::from(size / dim as f64).to_kind(Kind::Float).set_requires_grad(true);
        Ok(Boundary { fraction, dim })
    }

    /// The size of the space it divides.
    pub fn dim(&self) -> i64 {
        self.dim
    }

    /// The trainable parameter, the boundary as a fraction of `dim` (a float32 scalar on the CPU, requires grad).
    pub fn parameter(&self) -> &Tensor {
        &self.fraction
    }

    /// `clamp(fraction, 0, 1) · dim`, differentiable (a float32 scalar).
    pub fn size_tensor(&self) -> Tensor {
        self.fraction.clamp(0.0, 1.0) * self.dim as f64
    }

    /// The boundary in dimensions (not rounded).
    pub fn size(&self) -> f64 {
        self.size_tensor().double_value(&[])
    }

    /// The number of dimensions [`Boundary::hard_mask`] swaps: `round(size)`.
    pub fn dims(&self) -> i64 {
        self.size().round() as i64
    }

    /// The soft mask at temperature `temperature` (> 0), `[dim]` float32, differentiable with respect to
    /// [`Boundary::parameter`].
    pub fn mask(&self, temperature: f64) -> Result<Tensor> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(invalid(format!("the mask's temperature must be positive and finite, given {temperature}")));
        }
        let index = Tensor::arange(self.dim, (Kind::Float, Device::Cpu));
        Ok(((self.size_tensor() - index - 0.5) / temperature).sigmoid())
    }

    /// 1 for the first `round(size)` dimensions, 0 after: `[dim]` float32, no gradient.
    pub fn hard_mask(&self) -> Tensor {
        let index = Tensor::arange(self.dim, (Kind::Float, Device::Cpu));
        index.lt(self.dims() as f64).to_kind(Kind::Float)
    }
}

/// The interchange of boundless DAS: `h' = ((1 − m) ⊙ (h_b R) + m ⊙ (h_s R)) Rᵀ` for rows `h_b` (the base run's
/// hidden state) and `h_s` (the source's), `R` `[dim, dim]` orthogonal and `m` `[dim]` a mask over the rotated
/// dimensions. With `m = 1` it is `h_s` (activation patching), with `m = 0` it is `h_b`; in between, the rotated
/// subspace `m` selects is taken from the source and the rest kept from the base.
///
/// `base` and `source` are `[.., dim]` of the same shape. Everything is converted to `base`'s dtype and device;
/// gradients flow to `rotation` and `mask`.
pub fn interchange(base: &Tensor, source: &Tensor, rotation: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dim = *base.size().last().unwrap_or(&0);
    if base.size() != source.size() || rotation.size() != [dim, dim] || mask.size() != [dim] || dim == 0 {
        return Err(invalid(format!(
            "interchange needs base and source of one shape [.., dim], a [dim, dim] rotation and a [dim] mask; given \
             base {:?}, source {:?}, rotation {:?}, mask {:?}",
            base.size(),
            source.size(),
            rotation.size(),
            mask.size()
        )));
    }
    let (kind, device) = (base.kind(), base.device());
    let r = rotation.to_kind(kind).to_device(device);
    let m = mask.to_kind(kind).to_device(device);
    let mixed: Tensor = base.matmul(&r) * (m.ones_like() - &m) + source.to_kind(kind).to_device(device).matmul(&r) * &m;
    Ok(mixed.matmul(&r.tr()))
}

/// SplitMix64 (Steele, Lea and Flood 2014) with Box–Muller normals: the seeded generator of this module (random
/// rotations, the order of training batches).
#[derive(Debug, Clone)]
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed ^ 0x6A09_E667_F3BC_C909)
    }
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }
    /// A standard normal number.
    fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
    /// A uniform index below `n` (> 0).
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
