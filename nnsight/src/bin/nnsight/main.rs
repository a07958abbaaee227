//! The `nnsight` command: serve models to remote clients, print a model's module tree, stream a continuation.
//!
//! ```text
//! nnsight serve --model models/SmolLM2-135M-Instruct.Q4_1.gguf=smollm2 --listen 127.0.0.1:8080
//! nnsight tree models/SmolLM2-135M-Instruct.Q4_1.gguf
//! nnsight generate models/SmolLM2-135M-Instruct.Q4_1.gguf "The Eiffel Tower is in the city of"
//! nnsight new ../exp      # a crate of your own that depends on nnsight, ready for `cargo run`
//! ```

mod new;

use clap::{Parser, Subcommand};
use nnsight::models::AutoModel;
use nnsight::remote::{CoBatch, Limits, RedisOptions, RedisQueue, ServeOptions, Server};
use nnsight::{GenerateOptions, LanguageModel, SharedModel, TextStream};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "nnsight", version, about = "Serve, inspect and run models for nnsight")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a crate of your own that depends on nnsight: a short experiment on the default model in
    /// `src/main.rs`, a test with one `intervene!` block, and a `build.rs` that puts libtorch on the run path.
    /// Plain `cargo run` and `cargo test` then work there with nothing exported.
    New {
        /// The folder to create (its name becomes the crate's).
        path: PathBuf,
        /// Depend on the nnsight crate in this folder (default: the one this command was built from).
        #[arg(long, value_name = "DIR", conflicts_with = "git")]
        nnsight_path: Option<PathBuf>,
        /// Depend on nnsight from this git repository instead.
        #[arg(long, value_name = "URL")]
        git: Option<String>,
        /// With --git: the branch.
        #[arg(long, requires = "git", conflicts_with = "rev")]
        branch: Option<String>,
        /// With --git: the revision.
        #[arg(long, requires = "git")]
        rev: Option<String>,
    },
    /// Serve models to clients (`intervene!(model.trace(..).remote(&server) { .. })`). Only the graph's ops run
    /// on this machine, never client code.
    Serve {
        /// A model to serve, `PATH` or `PATH=NAME` (a Hugging Face folder or a .gguf file; the name defaults to
        /// the file's stem). Repeat for several models.
        #[arg(long = "model", required = true, value_name = "PATH[=NAME]")]
        models: Vec<String>,
        /// Address to listen on. A non-loopback address needs API keys.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// A file of API keys, one per line (else the comma-separated keys of NNSIGHT_API_KEYS; none: loopback
        /// only, no key needed).
        #[arg(long, value_name = "FILE")]
        keys: Option<PathBuf>,
        /// Worker threads per model: that many of its batches run at once. They share one copy of the weights.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Whether trace jobs waiting for a model run together as one batch (`off`: every job alone, bit for bit
        /// as a local run of it).
        #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
        co_batch: String,
        /// Most rows of one co-batch (all its jobs' invokes together).
        #[arg(long, default_value_t = 64)]
        batch_rows: usize,
        /// How long a worker that took a job waits for more to fill its batch, in milliseconds.
        #[arg(long, default_value_t = 2)]
        batch_wait_ms: u64,
        /// Jobs that may wait per model before the server answers "busy".
        #[arg(long, default_value_t = 64)]
        queue: usize,
        /// Largest request, in MiB.
        #[arg(long, default_value_t = 64)]
        max_request_mib: u64,
        /// Most graph nodes per request.
        #[arg(long, default_value_t = 100_000)]
        max_nodes: u64,
        /// Most saved bytes per request, in MiB.
        #[arg(long, default_value_t = 1024)]
        max_saved_mib: u64,
        /// Largest value a job's graph may compute, in MiB.
        #[arg(long, default_value_t = 1024)]
        max_value_mib: u64,
        /// Longest a job may run, in seconds.
        #[arg(long, default_value_t = 300.0)]
        max_seconds: f64,
        /// Share jobs with every server on this Redis (`redis://HOST:PORT`): jobs queue there, any server's
        /// workers run them, any server answers for any job. Without it, jobs queue in this process.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// With --redis: seconds a running job may go without its worker's heartbeat before another server takes
        /// it over and runs it again.
        #[arg(long, requires = "redis", default_value_t = 30.0)]
        reclaim_after: f64,
    },
    /// Print a model's module tree (paths, types, parameter shapes).
    Tree {
        /// A Hugging Face folder or a .gguf file.
        model: PathBuf,
    },
    /// Stream a continuation of a prompt.
    Generate {
        /// A Hugging Face folder or a .gguf file.
        model: PathBuf,
        /// The prompt.
        prompt: String,
        /// Most new tokens.
        #[arg(long, default_value_t = 40)]
        max_new_tokens: usize,
        /// Sample instead of taking the most likely token.
        #[arg(long)]
        sample: bool,
        /// Sampling temperature.
        #[arg(long)]
        temperature: Option<f64>,
        /// Sampling seed.
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli.command) {
        eprintln!("nnsight: error: {e}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::New { path, nnsight_path, git, branch, rev } => {
            let source = match (git, nnsight_path.or_else(new::built_from)) {
                (Some(url), _) => new::Source::Git { url, branch, rev },
                (None, Some(dir)) => new::Source::Path(dir),
                (None, None) => {
                    return Err("the nnsight crate this command was built from is gone: give --nnsight-path DIR (the nnsight/ folder of a clone) or --git URL".into())
                }
            };
            print!("{}", new::create(&path, &source)?);
            Ok(())
        }
        Command::Serve {
            models,
            listen,
            keys,
            workers,
            co_batch,
            batch_rows,
            batch_wait_ms,
            queue,
            max_request_mib,
            max_nodes,
            max_saved_mib,
            max_value_mib,
            max_seconds,
            redis,
            reclaim_after,
        } => {
            // One line per job on stderr (target `nnsight::job`: id, model, key id, nodes, rows, queue wait, run
            // time, outcome). A stderr nobody reads any more (a closed pipe) loses the lines, quietly: reporting
            // that on stderr too would panic the worker thread writing the line.
            let _ = tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_target(true)
                .log_internal_errors(false)
                .try_init();
            let keys = match keys {
                Some(file) => ServeOptions::keys_from_file(&file)?,
                None => std::env::var("NNSIGHT_API_KEYS")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(String::from)
                    .collect(),
            };
            if !(max_seconds.is_finite() && max_seconds > 0.0) {
                return Err(format!("--max-seconds must be a positive number, not {max_seconds}").into());
            }
            if !(reclaim_after.is_finite() && reclaim_after > 0.0) {
                return Err(format!("--reclaim-after must be a positive number, not {reclaim_after}").into());
            }
            let limits = Limits {
                request_bytes: max_request_mib << 20,
                graph_nodes: max_nodes,
                saved_bytes: max_saved_mib << 20,
                value_bytes: max_value_mib << 20,
                wall_time: Duration::from_secs_f64(max_seconds),
            };
            // Checked before loading anything.
            if keys.is_empty() && !listen.ip().is_loopback() {
                return Err(format!("refusing to serve on {listen} without API keys: give --keys FILE or NNSIGHT_API_KEYS, or listen on a loopback address").into());
            }
            let mut loaded = Vec::new();
            for spec in &models {
                let (path, name) = match spec.split_once('=') {
                    Some((p, n)) if !n.is_empty() => (PathBuf::from(p), n.to_string()),
                    _ => {
                        let p = PathBuf::from(spec);
                        let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                        (p, stem)
                    }
                };
                if loaded.iter().any(|(n, _): &(String, _)| n == &name) {
                    return Err(format!("two models are named `{name}`: name them with PATH=NAME").into());
                }
                if workers == 0 {
                    return Err("--workers must be at least 1".into());
                }
                let model = LanguageModel::<AutoModel>::load(&path)?;
                eprintln!(
                    "loaded `{name}` ({}) from {}{}",
                    model.model().architecture(),
                    path.display(),
                    if workers > 1 { format!(", {workers} workers sharing it") } else { String::new() }
                );
                let shared = SharedModel::new(model);
                loaded.push((name, vec![shared; workers]));
            }
            let names: Vec<String> = loaded.iter().map(|(n, _)| n.clone()).collect();
            let key_count = keys.len();
            if batch_rows == 0 {
                return Err("--batch-rows must be at least 1".into());
            }
            let co_batch = CoBatch {
                enabled: co_batch == "on",
                max_rows: batch_rows,
                max_wait: Duration::from_millis(batch_wait_ms),
            };
            let options = ServeOptions { listen, keys, limits, queue, co_batch };
            let broker = redis.as_ref().map(|url| RedisOptions {
                reclaim_after: Duration::from_secs_f64(reclaim_after),
                ..RedisOptions::new(url.as_str())
            });
            let server = match broker {
                Some(broker) => RedisQueue::serve(loaded, options, broker)?,
                None => Server::start_pools(loaded, options)?,
            };
            eprintln!(
                "serving {} at {} ({}{})",
                names.join(", "),
                server.url(),
                if key_count == 0 {
                    "no API keys: this machine only".to_string()
                } else {
                    format!("{key_count} API key(s)")
                },
                match &redis {
                    Some(url) => format!(
                        "; jobs shared through Redis as consumer {}",
                        RedisOptions::new(url.as_str()).consumer_name()
                    ),
                    None => String::new(),
                }
            );
            server.wait();
            Ok(())
        }
        Command::Tree { model } => {
            let model = LanguageModel::<AutoModel>::load(&model)?;
            println!("{}", model.tree());
            Ok(())
        }
        Command::Generate { model, prompt, max_new_tokens, sample, temperature, seed } => {
            let model = LanguageModel::<AutoModel>::load(&model)?;
            let mut options = GenerateOptions::new().max_new_tokens(max_new_tokens);
            if sample {
                options = options.do_sample(true);
            }
            if let Some(t) = temperature {
                options = options.temperature(t);
            }
            if let Some(s) = seed {
                options = options.seed(s);
            }
            let mut stream = TextStream::new();
            print!("{prompt}");
            std::io::stdout().flush()?;
            model.generate_stream(prompt.as_str(), &options, |step| {
                if let Some(Some(token)) = step.tokens.first() {
                    print!("{}", stream.push(&model, *token)?);
                    let _ = std::io::stdout().flush();
                }
                Ok(())
            })?;
            println!("{}", stream.finish(&model)?);
            Ok(())
        }
    }
}
