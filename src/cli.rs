//! The command line: `serve`, `check`, `init`, `projections rebuild`,
//! `log migrate`, `bench`, `token hash`, `completions`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::daemon::{Daemon, StartOptions};
use crate::domain::Domain;

/// cqrsd: a CQRS / event-sourcing backend declared in TOML and served as a REST API.
#[derive(Debug, Parser)]
#[command(name = "cqrsd", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Format of the daemon's log lines (overrides `[logging] format`).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon. Without --config: embedded log, ./cqrsd-data, 127.0.0.1:8080, example domain.
    Serve {
        /// The configuration file (TOML).
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check the configuration and the domain file; exit non-zero listing every problem.
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write a working config.toml and the example domain.toml into DIR (never overwrites).
    Init {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Operate on projections offline (the daemon must not be running).
    Projections {
        #[command(subcommand)]
        action: ProjectionsAction,
    },
    /// Operate on the embedded event log offline (the daemon must not be running).
    Log {
        #[command(subcommand)]
        action: LogAction,
    },
    /// Load generator: drive a daemon (--url) or one started here on a temporary
    /// directory, and report throughput and latency percentiles next to their limit.
    Bench(BenchArgs),
    /// Make bearer tokens for `[auth]`.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `cqrsd bench` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The scenario to run; `all` runs every one.
    #[arg(value_enum)]
    pub scenario: crate::bench::Scenario,
    /// Seconds of each measured phase.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// Print one JSON object per scenario instead of the table.
    #[arg(long)]
    pub json: bool,
    /// A running daemon (loopback only); without it one is started in this process.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Open loop: send at this many operations per second (latency counted from
    /// the intended send time) instead of closed-loop clients.
    #[arg(long, value_name = "PER_SEC")]
    pub rate: Option<f64>,
    /// Concurrent clients (closed loop), each with its keep-alive connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub clients: u64,
    /// Events pre-filled for projection, restart and rebuild.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub events: u64,
    /// Aggregates (accounts): opened first by the command scenarios (default
    /// 10,000; 1,000 for kafka), or spread over the pre-filled events (default 10,000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub aggregates: Option<u64>,
    /// Kafka bootstrap servers for `kafka`; else a Tansu broker is started if one is installed.
    #[arg(long)]
    pub brokers: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsAction {
    /// Rebuild a view or aggregation from the start of the event log, beside the
    /// live data, then swap it in.
    Rebuild {
        /// The projection's name in the domain file.
        name: String,
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LogAction {
    /// Convert the sled event log of earlier cqrsd versions (`<data_dir>/log`)
    /// into segment files (`<data_dir>/eventlog`), keeping every offset, so
    /// positions stay valid. The old database is kept as `log.sled-migrated`.
    Migrate {
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Print a new random token and the `[[auth.tokens]]` entry holding its hash.
    /// Only the hash goes into the configuration; hand the token to the client.
    Hash {
        /// The token's name: shown in logs and recorded as the principal of its commands.
        #[arg(long, default_value = "client")]
        name: String,
        /// Its roles (repeat or comma-separate).
        #[arg(long = "role", value_enum, value_delimiter = ',', default_values_t = [TokenRole::Command, TokenRole::Query])]
        roles: Vec<TokenRole>,
        /// Hash the token read from standard input instead of making one
        /// (the token is not printed).
        #[arg(long)]
        stdin: bool,
    },
}

/// The roles as the command line spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenRole {
    Command,
    Query,
    Admin,
}

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config.as_deref(), cli.log_format),
        Command::Check { config } => check(config.as_deref()),
        Command::Init { dir } => init(&dir),
        Command::Projections {
            action: ProjectionsAction::Rebuild { name, config },
        } => rebuild(&name, config.as_deref()),
        Command::Log {
            action: LogAction::Migrate { config },
        } => migrate_log(config.as_deref()),
        Command::Bench(args) => bench(args),
        Command::Token {
            action: TokenAction::Hash { name, roles, stdin },
        } => token_hash(&name, &roles, stdin),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "cqrsd", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
    }
}

fn serve(config_path: Option<&Path>, log_format: Option<LogFormat>) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    crate::telemetry::init_logging(
        &config.logging.level,
        log_format.unwrap_or(config.logging.format),
    );
    if config_path.is_none() {
        tracing::info!(
            "no --config given: running on the defaults (embedded log, ./cqrsd-data, 127.0.0.1:8080)"
        );
    }
    let options = StartOptions {
        handle_signals: true,
        config_path: config_path.map(Path::to_path_buf),
        ..StartOptions::default()
    };
    let result = Daemon::start(config, options).and_then(Daemon::wait);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(config_path: Option<&Path>) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            eprint!("{error}");
            return ExitCode::from(2);
        }
    };
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    let domain_name = config.domain_path().map_or_else(
        || "built-in example".to_owned(),
        |p| p.display().to_string(),
    );
    let source = match config.domain_source() {
        Ok(source) => source,
        Err(error) => {
            eprint!("{error}");
            return ExitCode::from(2);
        }
    };
    match Domain::from_toml_str(&source) {
        Ok(domain) => {
            if let Err(message) = crate::daemon::check_policies_fit_role(&domain, config.node.role)
            {
                eprintln!("invalid configuration for domain {domain_name}: {message}");
                return ExitCode::from(2);
            }
            println!(
                "configuration OK; domain {domain_name}: {} aggregate(s), {} projection(s), {} policies",
                domain.aggregates().count(),
                domain.projections().count(),
                domain.policies().count()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!(
                "invalid domain {domain_name} ({} problem(s)):",
                errors.0.len()
            );
            for error in &errors.0 {
                eprintln!("  - {}: {}", error.place, error.reason);
            }
            ExitCode::from(2)
        }
    }
}

/// The configuration `init` writes: every fixed key of the design, pointing at
/// the domain file written beside it.
const INIT_CONFIG: &str = r#"# cqrsd configuration, written by `cqrsd init`.
# Every key and its default is documented in config.toml.example.

[http]
listen = "127.0.0.1:8080"

[storage]
data_dir = "./cqrsd-data"

[domain]
path = "domain.toml"          # relative to this file

[log]
backend = "embedded"

[command]
threads = 1

[query]
threads = 1

[projections]
workers = 1
"#;

fn init(dir: &Path) -> ExitCode {
    let files = [
        ("config.toml", INIT_CONFIG),
        ("domain.toml", crate::domain::EXAMPLE_DOMAIN),
    ];
    let existing: Vec<String> = files
        .iter()
        .map(|(name, _)| dir.join(name))
        .filter(|path| path.exists())
        .map(|path| path.display().to_string())
        .collect();
    if !existing.is_empty() {
        eprintln!(
            "refusing to overwrite existing files: {}",
            existing.join(", ")
        );
        return ExitCode::from(2);
    }
    if let Err(error) = std::fs::create_dir_all(dir) {
        eprintln!("cannot create {}: {error}", dir.display());
        return ExitCode::FAILURE;
    }
    for (name, text) in files {
        let path = dir.join(name);
        // `create_new` closes the race with another process creating the file
        // between the check above and this write.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()));
        if let Err(error) = written {
            eprintln!("cannot write {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    println!(
        "next: cqrsd serve --config {}",
        dir.join("config.toml").display()
    );
    ExitCode::SUCCESS
}

/// `cqrsd projections rebuild`: an offline rebuild with a progress bar. The
/// stores' file locks make it fail clearly while a daemon uses the data directory.
fn rebuild(name: &str, config_path: Option<&Path>) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            eprint!("{error}");
            return ExitCode::from(2);
        }
    };
    match crate::daemon::rebuild_projection(&config, name, |bar_total| {
        let bar = indicatif::ProgressBar::new(bar_total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} records, {msg} ({per_sec}, ETA {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    }) {
        Ok(events) => {
            println!("rebuilt projection {name}: {events} event(s) applied");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cqrsd log migrate`: the offline conversion of a sled log, with a progress bar.
fn migrate_log(config_path: Option<&Path>) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            eprint!("{error}");
            return ExitCode::from(2);
        }
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} records ({per_sec}, ETA {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let result = crate::store::migrate::migrate_legacy_log(
        &config.storage.data_dir,
        &mut |total| bar.set_length(total),
        &mut |n| bar.inc(n),
    );
    bar.finish_and_clear();
    match result {
        Ok(done) => {
            println!(
                "migrated {} record(s) of {} topic(s) to {}; the old log is kept at {} \
                 (delete it once the daemon runs on the new one)",
                done.records,
                done.topics,
                config
                    .storage
                    .data_dir
                    .join(crate::store::segment_log::LOG_DIR)
                    .display(),
                done.kept_at.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `cqrsd bench`: runs the scenario(s); exit 2 on bad arguments, 1 on failure.
fn bench(args: BenchArgs) -> ExitCode {
    if args
        .rate
        .is_some_and(|rate| !(rate.is_finite() && rate > 0.0))
    {
        eprintln!("--rate must be a positive number of operations per second");
        return ExitCode::from(2);
    }
    let options = crate::bench::Options {
        scenario: args.scenario,
        duration: std::time::Duration::from_secs(args.duration),
        json: args.json,
        url: args.url,
        rate: args.rate,
        clients: usize::try_from(args.clients).unwrap_or(64),
        events: args.events,
        aggregates: args.aggregates,
        brokers: args.brokers,
    };
    match crate::bench::run(&options) {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cqrsd token hash`: a new token (or one from stdin) and its config entry.
fn token_hash(name: &str, roles: &[TokenRole], stdin: bool) -> ExitCode {
    let token = if stdin {
        let mut line = String::new();
        if let Err(error) = std::io::stdin().read_line(&mut line) {
            eprintln!("cannot read the token from standard input: {error}");
            return ExitCode::FAILURE;
        }
        let token = line.trim().to_owned();
        if token.is_empty() || token.contains(char::is_whitespace) {
            eprintln!("standard input holds no token (one line, no spaces)");
            return ExitCode::from(2);
        }
        // SHA-256 protects only high-entropy tokens (see `auth`); say so
        // rather than refuse, as an operator may be migrating existing ones.
        if token.len() < 32 {
            eprintln!(
                "warning: this token is short; tokens should carry at least 32 random bytes (`cqrsd token hash` makes such tokens)"
            );
        }
        token
    } else {
        match crate::auth::generate_token() {
            Ok(token) => token,
            Err(error) => {
                eprintln!("cannot read the system's random source: {error}");
                return ExitCode::FAILURE;
            }
        }
    };
    let roles: Vec<String> = roles
        .iter()
        .map(|role| {
            format!(
                "\"{}\"",
                match role {
                    TokenRole::Command => "command",
                    TokenRole::Query => "query",
                    TokenRole::Admin => "admin",
                }
            )
        })
        .collect();
    if !stdin {
        println!(
            "# The token; give it to the client (Authorization: Bearer <token>). It is not stored anywhere:"
        );
        println!("# {token}");
        println!();
    }
    println!("# Add to the configuration file, then reload (SIGHUP) or restart:");
    println!("[[auth.tokens]]");
    println!("name = {}", toml_string(name));
    println!("hash = \"{}\"", crate::auth::hash_token(&token));
    println!("roles = [{}]", roles.join(", "));
    ExitCode::SUCCESS
}

/// A TOML basic string (quoted and escaped).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}
