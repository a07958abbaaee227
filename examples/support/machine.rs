//! What machine a benchmark ran on, printed beside its figures (timings differ 2x between CPU models).

/// The CPU model (`model name` in /proc/cpuinfo) and the number of logical CPUs, e.g. `AMD EPYC 7B13 (2 CPUs)`.
pub fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".to_string());
    let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{model} ({n} CPUs)")
}
