//! The CPU linear kernel each shape class took (`nnsight::nn::fast_linear`), for the benchmarks' reports.

use nnsight::nn::fast_linear::{self, LinearMode, RowsBucket};

/// Prints the kernel each linear shape class took under the automatic mode in this process, with the probe's
/// medians; `rows` names the row counts the benchmark ran (e.g. "prompt forward 9 rows, decoding step 1 row").
pub fn print_choices(rows: &str) {
    let mode = fast_linear::process_linear_mode();
    if mode != LinearMode::Auto {
        println!("  linear kernels: forced to {mode:?} for the process (NNSIGHT_LINEAR / NNSIGHT_NO_ONEDNN)");
        return;
    }
    println!("  linear kernels chosen by the automatic mode ({rows}); probe medians oneDNN / at::linear:");
    for (key, choice) in fast_linear::linear_choices() {
        let bias = if key.bias { " + bias" } else { "" };
        println!(
            "    rows {:<6} {:>5} -> {:<6}{bias}: {:<7} ({} / {} µs)",
            bucket(key.rows),
            key.in_features,
            key.out_features,
            format!("{:?}", choice.path),
            us(choice.onednn_us),
            us(choice.aten_us)
        );
    }
}

fn bucket(rows: RowsBucket) -> &'static str {
    match rows {
        RowsBucket::One => "1",
        RowsBucket::UpTo4 => "2-4",
        RowsBucket::UpTo16 => "5-16",
        RowsBucket::UpTo64 => "17-64",
        RowsBucket::Over64 => "65+",
    }
}

fn us(t: Option<f64>) -> String {
    t.map_or_else(|| "-".to_string(), |t| format!("{t:.1}"))
}
