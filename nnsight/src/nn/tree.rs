//! The module tree: lists of modules, printing (like `print(model)` in PyTorch, with paths and parameter
//! shapes), and named parameters.

use super::Module;
use std::fmt;
use tch::Tensor;

/// A list of modules (`torch.nn.ModuleList`): children named `0`, `1`, ...
#[derive(Debug)]
pub struct ModuleList<T> {
    path: String,
    items: Vec<T>,
}

impl<T> ModuleList<T> {
    /// A list at `path` holding `items` (whose own paths end in `.0`, `.1`, ...).
    pub fn new(path: impl Into<String>, items: Vec<T>) -> Self {
        ModuleList { path: path.into(), items }
    }
    /// Number of modules.
    pub fn len(&self) -> usize {
        self.items.len()
    }
    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    /// The modules in order.
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.items.iter()
    }
    /// The module at `i`, if any.
    pub fn get(&self, i: usize) -> Option<&T> {
        self.items.get(i)
    }
    /// The modules in order, mutably.
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.items.iter_mut()
    }
    pub(crate) fn set_list_path(&mut self, path: &str) {
        self.path = path.to_string();
    }
}

impl<T: Module> Module for Vec<T> {
    fn path(&self) -> &str {
        ""
    }
    fn kind(&self) -> &'static str {
        "ModuleList"
    }
    fn children<'a>(&'a self, f: &mut dyn FnMut(&str, &'a dyn Module)) {
        for (i, m) in self.iter().enumerate() {
            f(&i.to_string(), m);
        }
    }
}

impl<T> std::ops::Index<usize> for ModuleList<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        &self.items[i]
    }
}

impl<'a, T> IntoIterator for &'a ModuleList<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

impl<T: Module> Module for ModuleList<T> {
    fn path(&self) -> &str {
        &self.path
    }
    fn kind(&self) -> &'static str {
        "ModuleList"
    }
    fn children<'a>(&'a self, f: &mut dyn FnMut(&str, &'a dyn Module)) {
        for (i, m) in self.items.iter().enumerate() {
            f(&i.to_string(), m);
        }
    }
}

/// Every parameter of `root` and its submodules, with its full dotted name (`model.layers.0.mlp.up_proj.weight`),
/// in module order. Parameters shared by two modules (tied embeddings) are listed once, under the first name.
pub fn named_parameters(root: &dyn Module) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = Vec::new();
    fn walk(m: &dyn Module, out: &mut Vec<(String, Tensor)>) {
        m.parameters(&mut |name, t| {
            // Meta tensors (a scan's twin) have no data pointer: they are compared as handles.
            let same = |u: &Tensor| match t.data_ptr().is_null() {
                false => u.data_ptr() == t.data_ptr() && u.size() == t.size(),
                true => crate::ffi::same_tensor(u, t),
            };
            let shared = out.iter().any(|(_, u)| same(u));
            if !shared {
                out.push((super::join_path(m.path(), name), t.shallow_clone()));
            }
        });
        m.children(&mut |_, c| walk(c, out));
    }
    walk(root, &mut out);
    out
}

/// Prints a module tree: one line per module with its attribute name, type, settings, dotted path and parameter
/// shapes. Runs of identical list items are folded (`(0-29): 30 x LlamaDecoderLayer`), as PyTorch does.
pub struct ModuleTree<'a>(pub &'a dyn Module);

/// A module's printed form without its path, used to find identical list items.
fn signature(m: &dyn Module) -> String {
    let mut s = format!("{}({})[", m.kind(), m.describe());
    m.parameters(&mut |n, t| s.push_str(&format!("{n}:{:?}:{:?};", t.size(), t.kind())));
    s.push(']');
    m.children(&mut |n, c| s.push_str(&format!("({n}){}", signature(c))));
    s
}

fn params_text(m: &dyn Module) -> String {
    let mut parts = Vec::new();
    m.parameters(&mut |n, t| parts.push(format!("{n} {:?}", t.size())));
    if parts.is_empty() {
        String::new()
    } else {
        format!("  [{}]", parts.join(", "))
    }
}

fn write_node<'a>(f: &mut fmt::Formatter<'_>, name: &str, path: &str, m: &'a dyn Module, depth: usize) -> fmt::Result {
    let indent = "  ".repeat(depth);
    let label = if name.is_empty() { String::new() } else { format!("({name}): ") };
    let mut kids: Vec<(String, &'a dyn Module)> = Vec::new();
    m.children(&mut |n, c| kids.push((n.to_string(), c)));
    let shown = if path.is_empty() { String::new() } else { format!("  <{path}>") };
    if kids.is_empty() {
        return writeln!(f, "{indent}{label}{}({}){shown}{}", m.kind(), m.describe(), params_text(m));
    }
    writeln!(f, "{indent}{label}{}({}{shown}{}", m.kind(), m.describe(), params_text(m))?;
    let mut i = 0;
    while i < kids.len() {
        let sig = signature(kids[i].1);
        let mut j = i + 1;
        let numbered = kids[i].0.parse::<usize>().is_ok();
        while numbered && j < kids.len() && signature(kids[j].1) == sig {
            j += 1;
        }
        if j - i > 1 {
            let first = kids[i].1;
            let folded = format!("{}-{}", kids[i].0, kids[j - 1].0);
            writeln!(f, "{}  ({folded}): {} x", indent, j - i)?;
            write_node(f, "", &super::join_path(path, &kids[i].0), first, depth + 2)?;
        } else {
            write_node(f, &kids[i].0, &super::join_path(path, &kids[i].0), kids[i].1, depth + 1)?;
        }
        i = j;
    }
    writeln!(f, "{indent})")
}

impl fmt::Display for ModuleTree<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_node(f, "", self.0.path(), self.0, 0)
    }
}
