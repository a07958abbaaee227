//! The block kinds of `intervene!`: the `FORM` of `ROOT.FORM(..) { .. }`, one [`Form`] variant each.
//!
//! Every question the phases ask about a block kind is a method here with an exhaustive `match`, so a new kind is
//! one variant plus the arms the compiler asks for (here, in [`super::expand`], and in [`Form::ALL`]).

use proc_macro2::Ident;

/// A block kind: which runtime type builds and runs the block, and which frame it accepts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Form {
    /// `ROOT.trace(INPUT?) { .. }`: one forward pass.
    Trace,
    /// `ROOT.scan(INPUT?) { .. }`: the same block, run on shapes alone (the model's meta twin).
    Scan,
    /// `ROOT.generate(INPUT, OPTIONS?) { .. }`: decoding, one forward pass per new token.
    Generate,
    /// `ROOT.edit() { .. }`: a persistent edit; the block is the edited model.
    Edit,
    /// `ROOT.edit_in_place() { .. }`: a persistent edit added to the model itself.
    EditInPlace,
}

impl Form {
    /// Every form. The `match` fails to compile until a new variant is named in it: list it in the array too.
    const ALL: [Form; 5] = {
        match Form::Trace {
            Form::Trace | Form::Scan | Form::Generate | Form::Edit | Form::EditInPlace => {}
        }
        [Form::Trace, Form::Scan, Form::Generate, Form::Edit, Form::EditInPlace]
    };

    /// The form the token names, if any.
    pub fn from_ident(ident: &Ident) -> Option<Form> {
        Form::ALL.into_iter().find(|form| ident == form.name())
    }

    /// The method name written in the block: `trace`, `scan`, ...
    pub fn name(self) -> &'static str {
        match self {
            Form::Trace => "trace",
            Form::Scan => "scan",
            Form::Generate => "generate",
            Form::Edit => "edit",
            Form::EditInPlace => "edit_in_place",
        }
    }

    /// Whether the block runs on shapes alone (never on real values).
    pub fn runs_on_shapes(self) -> bool {
        match self {
            Form::Scan => true,
            Form::Trace | Form::Generate | Form::Edit | Form::EditInPlace => false,
        }
    }

    /// Whether the block is a persistent edit: no input, no invokes, applied to every later run; an expression.
    pub fn is_edit(self) -> bool {
        match self {
            Form::Edit | Form::EditInPlace => true,
            Form::Trace | Form::Scan | Form::Generate => false,
        }
    }

    /// Whether the block takes options after its input (`generate(input, options)`).
    pub fn takes_options(self) -> bool {
        match self {
            Form::Generate => true,
            Form::Trace | Form::Scan | Form::Edit | Form::EditInPlace => false,
        }
    }

    /// Whether the block may run on a server (`.remote(server)`): not one that runs here, on shapes or as an edit.
    pub fn may_be_remote(self) -> bool {
        !self.runs_on_shapes() && !self.is_edit()
    }

    /// Whether the block may hold `invoke(..) { .. }` blocks.
    pub fn may_have_invokes(self) -> bool {
        !self.is_edit()
    }

    /// Whether the block may stand in a `ROOT.session() { .. }` (written there without `ROOT.`).
    pub fn in_session(self) -> bool {
        match self {
            Form::Trace | Form::Scan | Form::Generate => true,
            Form::Edit | Form::EditInPlace => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proc_macro2::Span;

    #[test]
    fn names_read_back() {
        for form in Form::ALL {
            assert_eq!(Form::from_ident(&Ident::new(form.name(), Span::call_site())), Some(form));
        }
        assert_eq!(Form::from_ident(&Ident::new("tracee", Span::call_site())), None);
    }
}
