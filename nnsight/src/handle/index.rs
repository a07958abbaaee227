//! How indices and shapes are written in a block: tch-style index items (an integer, a range, `..`, [`NewAxis`]) and
//! tuples of them ([`IntoIndex`]), and dimension lists ([`IntoDims`]), turned into the graph's serializable form.

use crate::graph::IndexItem;
use std::ops::{Range, RangeFrom, RangeFull, RangeInclusive, RangeTo, RangeToInclusive};

/// One item of a tch-style index: an integer, a range, `..`, or [`NewAxis`].
pub trait IntoIndexItem {
    /// The serializable item.
    fn item(self) -> IndexItem;
}

/// A new dimension of size 1 in an index (`None` in PyTorch).
#[derive(Debug, Clone, Copy)]
pub struct NewAxis;

impl IntoIndexItem for NewAxis {
    fn item(self) -> IndexItem {
        IndexItem::NewAxis
    }
}
impl IntoIndexItem for RangeFull {
    fn item(self) -> IndexItem {
        IndexItem::Slice { start: None, end: None }
    }
}

macro_rules! int_index {
    ($($t:ty),*) => {$(
        impl IntoIndexItem for $t {
            fn item(self) -> IndexItem {
                IndexItem::Select(self as i64)
            }
        }
        impl IntoIndexItem for Range<$t> {
            fn item(self) -> IndexItem {
                IndexItem::Slice { start: Some(self.start as i64), end: Some(self.end as i64) }
            }
        }
        impl IntoIndexItem for RangeFrom<$t> {
            fn item(self) -> IndexItem {
                IndexItem::Slice { start: Some(self.start as i64), end: None }
            }
        }
        impl IntoIndexItem for RangeTo<$t> {
            fn item(self) -> IndexItem {
                IndexItem::Slice { start: None, end: Some(self.end as i64) }
            }
        }
        impl IntoIndexItem for RangeInclusive<$t> {
            fn item(self) -> IndexItem {
                let end = *self.end() as i64;
                IndexItem::Slice { start: Some(*self.start() as i64), end: if end == -1 { None } else { Some(end + 1) } }
            }
        }
        impl IntoIndexItem for RangeToInclusive<$t> {
            fn item(self) -> IndexItem {
                let end = self.end as i64;
                IndexItem::Slice { start: None, end: if end == -1 { None } else { Some(end + 1) } }
            }
        }
    )*};
}
int_index!(i64, i32, usize);

/// A whole tch-style index: one item or a tuple of items (`(.., -1, ..)`).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a tensor index",
    label = "use an integer, a range, `..`, `NewAxis`, or a tuple of them, as with tch's `.i(...)`"
)]
pub trait IntoIndex {
    /// The items, outermost dimension first.
    fn items(self) -> Vec<IndexItem>;
}

impl<A: IntoIndexItem> IntoIndex for A {
    fn items(self) -> Vec<IndexItem> {
        vec![self.item()]
    }
}

macro_rules! tuple_index {
    ($($name:ident),+) => {
        impl<$($name: IntoIndexItem),+> IntoIndex for ($($name,)+) {
            #[allow(non_snake_case)]
            fn items(self) -> Vec<IndexItem> {
                let ($($name,)+) = self;
                vec![$($name.item()),+]
            }
        }
    };
}
tuple_index!(A);
tuple_index!(A, B);
tuple_index!(A, B, C);
tuple_index!(A, B, C, D);
tuple_index!(A, B, C, D, E);

/// Dimensions for reductions: one dimension or several.
pub trait IntoDims {
    /// The dimensions.
    fn dims(self) -> Vec<i64>;
}
impl IntoDims for i64 {
    fn dims(self) -> Vec<i64> {
        vec![self]
    }
}
impl IntoDims for i32 {
    fn dims(self) -> Vec<i64> {
        vec![self as i64]
    }
}
impl<const N: usize> IntoDims for [i64; N] {
    fn dims(self) -> Vec<i64> {
        self.to_vec()
    }
}
impl IntoDims for &[i64] {
    fn dims(self) -> Vec<i64> {
        self.to_vec()
    }
}
impl IntoDims for Vec<i64> {
    fn dims(self) -> Vec<i64> {
        self
    }
}
