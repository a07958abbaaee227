//! The Python side of a benchmark: a `scripts/peer/*.py --serve` process that says hello (its versions) on its
//! first line, then times a block of `n` rounds each time it reads `n`, and ends on `0`.

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// A running peer.
pub struct Peer {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    /// Its first line (versions and whatever else the script reports).
    pub hello: serde_json::Value,
}

impl Peer {
    /// Starts `python` on `args` (the script and its arguments) and reads its hello.
    pub fn start(python: &str, args: &[&str]) -> Result<Self, Box<dyn Error>> {
        eprintln!("starting the transformers peer ({python})...");
        let mut child = Command::new(python)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {python}: {e} (run `scripts/setup.sh peer`)"))?;
        let to = child.stdin.take().ok_or("no stdin")?;
        let mut from = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        from.read_line(&mut line)?;
        let hello = serde_json::from_str(&line).map_err(|e| format!("peer said {line:?}: {e}"))?;
        Ok(Peer { child, to, from, hello })
    }

    /// Has the peer time `rounds` rounds; its reply (`times_ms` and whatever else the script reports).
    pub fn block(&mut self, rounds: usize) -> Result<serde_json::Value, Box<dyn Error>> {
        writeln!(self.to, "{rounds}")?;
        let mut line = String::new();
        self.from.read_line(&mut line)?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Tells the peer to end and waits for it.
    pub fn finish(mut self) -> Result<(), Box<dyn Error>> {
        writeln!(self.to, "0")?;
        self.child.wait()?;
        Ok(())
    }
}

/// The `times_ms` of a block's reply.
pub fn times(block: &serde_json::Value) -> Result<Vec<f64>, Box<dyn Error>> {
    Ok(block["times_ms"].as_array().ok_or("bad peer reply")?.iter().filter_map(|v| v.as_f64()).collect())
}
