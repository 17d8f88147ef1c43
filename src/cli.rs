//! The command line: what each subcommand takes, and `main`'s dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands;
use crate::error::{exit, Error};
use crate::telemetry::LogFormat;

/// The sections `qseed --help` ends with and `qseed(8)` has, in one place: (man page
/// heading, text as `--help` shows it).
pub const SECTIONS: &[(&str, &str)] = &[
    (
        "EXIT STATUS",
        "  0  everything asked for was done
  1  another run-time failure
  2  a configuration or command-line error; nothing was attempted
  3  `once`: a target was not seeded because no entropy could be had from the source
  4  `once`: a target failed on the HSM side; `run`: every target has stopped (the packaged
     unit does not restart on it: fix the cause, then start it)",
    ),
    (
        "SIGNALS",
        "  SIGINT, SIGTERM  (`run`) stop cleanly: in-flight calls finish (or are left after 1.5 s),
                   the bytes left in the pool are flushed into the targets ([pool]
                   flush_timeout), sessions close, modules are finalized
  SIGHUP           (`run`) reload the configuration file; a burst counts once, at most one
                   reload every 2 s; unchanged targets keep their session and schedule",
    ),
    (
        "ENVIRONMENT",
        "  QSEED_CONFIG_FILE      the configuration file (as --config)
  QSEED_<TABLE>_<KEY>    overrides a key of [source], [pool], [telemetry] or [service]
                         (e.g. QSEED_SOURCE_URL, QSEED_TELEMETRY_LISTEN); see qseed.toml(5)
  QRYPT_TOKEN            the API token, when source.token_file is not set
  QSEED_LOG              a log filter, e.g. qseed=debug (instead of -v/-q)
  CREDENTIALS_DIRECTORY  systemd's credentials (token_file/pin_file \"credential:NAME\")
  STATE_DIRECTORY        systemd's state folder: the PIN guard and the replay record
  JOURNAL_STREAM         set by systemd: logs go to the journal when it names stderr
  HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY (either case)
                         the HTTP proxy to the entropy API, unless source.proxy is set",
    ),
    (
        "FILES",
        "  /etc/qseed/qseed.toml         the configuration (qseed.toml(5))
  /etc/qseed/qseed_config.yml   Qrypt's qseed's configuration, read when the TOML is absent
  /var/lib/qseed/pin-guard/     PINs a token refused, by token and PIN source (never a PIN)
  /var/lib/qseed/replay/        keyed hashes of recent blocks, to refuse a replayed answer
                                ($STATE_DIRECTORY or [service] state_dir, else
                                ~/.local/state/qseed for users who may not write
                                /var/lib/qseed)",
    ),
    (
        "EXAMPLES",
        "  qseed                                        # the service (`qseed run`)
  qseed demo                                   # try it: throwaway SoftHSM token + simulator
  qseed slots --module /usr/lib/softhsm/libsofthsm2.so
  qseed --config /etc/qseed/qseed.toml once    # one round over all targets (cron, timers)
  qseed doctor                                 # check a configuration, with fixes
  QRYPT_TOKEN=... qseed fetch --bytes 4K --output seed.bin",
    ),
];

/// `qseed --help`'s closing text: [`SECTIONS`], headed as `--help` heads them.
fn after_help() -> String {
    SECTIONS
        .iter()
        .map(|(heading, text)| {
            let mut heading = heading.to_lowercase();
            heading[..1].make_ascii_uppercase();
            format!("{heading}:\n{text}")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The heading global options have in every subcommand's help.
const GLOBAL: &str = "Global options";

/// qseed: seeds PKCS#11 HSM random generators with quantum entropy from Qrypt's API.
#[derive(Debug, Parser)]
#[command(name = "qseed", version, about, after_help = after_help())]
pub struct Cli {
    /// Configuration file: qseed's TOML, or Qrypt's qseed's YAML (told apart by content).
    /// [default: /etc/qseed/qseed.toml, else /etc/qseed/qseed_config.yml]
    #[arg(long, global = true, env = "QSEED_CONFIG_FILE", value_name = "PATH", help_heading = GLOBAL)]
    pub config: Option<PathBuf>,

    /// More detail in the log (debug level).
    #[arg(short, long, global = true, conflicts_with = "quiet", help_heading = GLOBAL)]
    pub verbose: bool,

    /// Only warnings and errors in the log.
    #[arg(short, long, global = true, help_heading = GLOBAL)]
    pub quiet: bool,

    /// How to log: auto (the journal under systemd, text elsewhere), text, json (one object
    /// per line, the final error included) or journal.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto, help_heading = GLOBAL,
          hide_possible_values = true, value_name = "FORMAT")]
    pub log_format: LogFormat,

    /// What to do; without one, `run` (as Qrypt's qseed and other daemons start).
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: seed every target at start, then once per period, until SIGINT/SIGTERM;
    /// SIGHUP reloads the configuration.
    #[command(after_help = "Example:\n  qseed --config /etc/qseed/qseed.toml run")]
    Run,

    /// Seed every target once, then exit: 0 when every target was seeded, 3 when entropy was
    /// missing, 4 when an HSM failed.
    #[command(after_help = "Example (a cron line):\n  */10 * * * * qseed --quiet once")]
    Once,

    /// Check a configuration like a support engineer would: the file, the API token (one
    /// minimal request, its bytes used for the seed checks), every module, token, login (tried
    /// once, never with a PIN the token refused before) and C_SeedRandom. Prints a checklist
    /// with a fix for each failure; exit 0 only when everything passes.
    #[command(after_help = "Examples:\n  \
        qseed --config /etc/qseed/qseed.toml doctor\n  \
        qseed doctor --retry-pin hsm-1     # present hsm-1's PIN once more, after fixing it\n  \
        sudo systemctl start qseed-doctor  # as the packaged service runs (its user, its \
        credentials); output: journalctl -u qseed-doctor -o cat")]
    Doctor {
        /// Lift the PIN guard of this target (a PIN the token refused is otherwise never
        /// presented again) and try its login once.
        #[arg(long, value_name = "TARGET")]
        retry_pin: Option<String>,
    },

    /// Check the configuration without side effects, like `nginx -t`: it parses, the files it
    /// names are readable and trusted, every module is a trusted shared library (not loaded),
    /// the state folder is usable. No API request, no login, no seed. Exit 0 or 2.
    #[command(after_help = "Examples:\n  \
        qseed --config /etc/qseed/qseed.toml check\n  \
        qseed --config new.toml check && sudo install -m 0640 -g qseed new.toml /etc/qseed/qseed.toml")]
    Check,

    /// Wait until the running service has seeded every target (or those named) since it
    /// started: exit 0 then, 4 with the reason at the timeout. For services that generate
    /// keys (the package's qseed-seeded.service).
    #[command(after_help = "Examples:\n  \
        qseed wait --timeout 2m\n  \
        qseed wait --target hsm-1 --target hsm-2\n  \
        # in a key-generating unit: After=qseed-seeded.service and Requires=qseed-seeded.service")]
    Wait {
        /// A target to wait for (repeat for several) [default: every target].
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
        /// Give up after this long (30s, 5m, 1h).
        #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
        timeout: std::time::Duration,
    },

    /// The audit ledger: every injection and flush as a JSON line chained to the one before
    /// by its SHA-256 (in the state folder's audit/ledger.jsonl).
    #[command(subcommand)]
    Audit(AuditCommand),

    /// Ask the running service to re-read its configuration and wait for the outcome: exit 0
    /// once the new configuration is in force, 2 when it was refused (the running one stays).
    /// The packaged unit's ExecReload=, so that `systemctl reload qseed` tells the truth.
    #[command(after_help = "Examples:\n  \
        ExecReload=/usr/bin/qseed reload --pid $MAINPID   # in the unit\n  \
        sudo systemctl reload qseed                       # fails when the file is refused")]
    Reload {
        /// The service's process id (in a unit: $MAINPID).
        #[arg(long, value_name = "PID")]
        pid: i32,
    },

    /// List PKCS#11 slots and tokens: a module's, to fill in a target; without --module,
    /// those of every module the configuration uses, with the token each target finds.
    /// Shows whether each token requires a login and the state of its user PIN.
    #[command(after_help = "Examples:\n  \
        qseed slots --module /usr/lib/softhsm/libsofthsm2.so\n  \
        qseed slots                      # the configuration's modules and targets\n  \
        qseed slots --json | jq '.modules[].slots[].token.label'\n\n\
        USER-PIN: ok, low (wrong PINs were given), final-try (one more wrong PIN locks it), \
        locked, not-set, change (the token asks for a new PIN), pin-pad (entered on the device).")]
    Slots {
        /// The HSM vendor's PKCS#11 library [default: the modules of the configuration].
        #[arg(long, value_name = "PATH")]
        module: Option<PathBuf>,
        /// Initialization parameters for modules that need them (NSS's softoken), passed to
        /// C_Initialize as pReserved.
        #[arg(long, value_name = "STRING", requires = "module")]
        init_args: Option<String>,
        /// One JSON document, for scripts.
        #[arg(long)]
        json: bool,
    },

    /// Download entropy to a file or to standard output (binary).
    #[command(after_help = "Examples:\n  \
        qseed fetch --bytes 48 --output seed.bin\n  \
        qseed fetch --bytes 1048576 | sha256sum\n\n\
        The [source] table of the configuration file is used when the file exists; otherwise \
        the Qrypt cloud service with the token in QRYPT_TOKEN.")]
    Fetch {
        /// How many bytes, 1 to 1 GiB: 4096, 1K, 64KiB, 4MiB, 1G (K, M, G are 1024-based; KB,
        /// MB, GB 1000-based).
        #[arg(long, value_name = "N", value_parser = fetch_size)]
        bytes: u64,
        /// Write here instead of standard output: to a temporary file beside it (mode 0600)
        /// renamed over FILE once complete, so a failed fetch leaves FILE as it was. FILE must
        /// be a regular file or absent; a symbolic link is refused.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// From this source of the configuration only ([[source]] name); by default the
        /// sources as the service uses them (failover or mix).
        #[arg(long, value_name = "NAME")]
        source: Option<String>,
    },

    /// Try qseed on a throwaway SoftHSM token and the local API simulator (or the real
    /// service when QRYPT_TOKEN is set); cleans up after itself.
    #[command(after_help = "Example:\n  qseed demo\n  QRYPT_TOKEN=... qseed demo --rounds 2")]
    Demo {
        /// Rounds per target.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
        /// SoftHSM's PKCS#11 library.
        #[arg(long, value_name = "PATH", default_value = commands::demo::SOFTHSM_MODULE)]
        module: PathBuf,
    },

    /// Print the shell completion script for SHELL (the package installs bash's, zsh's and
    /// fish's).
    #[command(after_help = "Examples:\n  \
        qseed completions bash > ~/.local/share/bash-completion/completions/qseed\n  \
        qseed completions zsh > \"${fpath[1]}/_qseed\"")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Write the man pages and shell completions, generated from this command line, into a
    /// folder (for packagers).
    #[command(hide = true)]
    GenerateAssets {
        /// Folder to write the man pages and the completions into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },

    /// Turn Qrypt's qseed YAML configuration into qseed's TOML: printed with a comment per
    /// choice, or written with --write DIR, where the inline token and PIN move into files of
    /// their own (0600). Secrets are never printed.
    #[command(after_help = "Examples:\n  \
        qseed migrate /etc/qseed/qseed_config.yml\n  \
        sudo qseed migrate /etc/qseed/qseed_config.yml --write /etc/qseed")]
    Migrate {
        /// The YAML file [default: --config, else /etc/qseed/qseed_config.yml].
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Write DIR/qseed.toml, DIR/qrypt.token and DIR/hsm.pin (never overwriting a file).
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },

    /// Serve the local entropy API simulator (TEST AND DEMO TOOL: OS randomness, not
    /// quantum entropy) until SIGINT/SIGTERM.
    #[command(after_help = "Example:\n  \
        QRYPT_TOKEN=test-token qseed simulator --listen 127.0.0.1:8443 --ca-out /tmp/sim-ca.pem")]
    Simulator {
        /// Address to listen on (loopback unless you really mean it).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// Write the throwaway CA certificate here, for source.ca_file.
        #[arg(long, value_name = "FILE")]
        ca_out: Option<PathBuf>,
        /// Serve plain HTTP instead of HTTPS.
        #[arg(long)]
        plain_http: bool,
        /// How POST /api/v1/entropy reads block_size: "bytes" (1..1024, the appliance's
        /// specification) or "kib" (1..512, as Qrypt's qseed sends it).
        #[arg(long, value_name = "UNIT", default_value = "bytes", value_parser = ["bytes", "kib"])]
        block_unit: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the ledger's chain: exit 0 when every line chains to the one before, 1 naming
    /// the first line that does not (edited, removed or inserted).
    #[command(after_help = "Examples:\n  \
        sudo -u qseed qseed audit verify   # the state folder's ledger, rotated files included\n  \
        qseed audit verify copy-of-ledger.jsonl\n  \
        qseed audit verify --public-key audit-key.pem   # the signed heads too")]
    Verify {
        /// Also check every signature record against this EC P-256 public key (PEM, as
        /// `openssl ec -pubout` writes it): the HSM's key that [audit] sign_with names.
        #[arg(long, value_name = "PEM")]
        public_key: Option<PathBuf>,
        /// Ledger files, oldest first [default: the state folder's].
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print the ledger's records (JSON lines) from --since up to --until, for an auditor.
    #[command(after_help = "Example:\n  \
        qseed audit export --since 2026-11-01T00:00:00Z --until 2026-12-01T00:00:00Z > november.jsonl")]
    Export {
        /// Records at or after this time (RFC 3339, UTC).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Records before this time (RFC 3339, UTC).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Ledger files, oldest first [default: the state folder's].
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

/// A duration as the configuration writes them (`30s`, `5m`).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}; write it like 30s or 5m"))
}

/// `fetch --bytes`: a byte count with units, 1 byte to 1 GiB.
fn fetch_size(text: &str) -> Result<u64, String> {
    let bytes = crate::units::parse_bytes(text)?;
    if !(1..=1 << 30).contains(&bytes) {
        return Err(format!("{text} is out of range: 1 byte to 1 GiB"));
    }
    Ok(bytes)
}

/// Parses the command line, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::CONFIG
            } else {
                exit::OK
            });
        }
    };
    use tracing::level_filters::LevelFilter;
    // doctor prints a checklist that holds every finding: log lines would only interleave
    // with it (-v brings them back).
    let checklist = matches!(cli.command, Some(Command::Doctor { .. }));
    let level = if cli.verbose {
        LevelFilter::DEBUG
    } else if checklist {
        LevelFilter::ERROR
    } else if cli.quiet {
        LevelFilter::WARN
    } else {
        LevelFilter::INFO
    };
    let format = crate::telemetry::init(level, cli.log_format);
    let result = run(cli);
    crate::telemetry::log_batch::flush();
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            match format {
                // A log pipeline or the journal gets the final error as one of its records.
                LogFormat::Json | LogFormat::Journal => {
                    tracing::error!(exit_status = e.exit_status(), "qseed: error: {e}")
                }
                LogFormat::Auto | LogFormat::Text => tell!("qseed: error: {e}"),
            }
            e.exit_code()
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    // Before any secret is read: no core dumps, no ptrace by other processes.
    crate::secret::memory::protect_process();
    // The demo points SoftHSM at a throwaway token folder through the environment, which is
    // only sound before any other thread exists, so it is prepared before the runtime starts.
    let demo_dir = match &cli.command {
        Some(Command::Demo { .. }) => Some(commands::demo::prepare_environment()?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // One thread runs every task: the work between PKCS#11 calls is small, and a second
        // worker only adds wake-ups as tasks move between the two (each module's PKCS#11 calls
        // run on threads of their own: see service::worker).
        .worker_threads(1)
        // Name lookups, entropy device reads and file writes.
        .max_blocking_threads(crate::service::worker::BLOCKING_THREADS)
        .build()
        .map_err(|e| Error::Failed(format!("cannot start the async runtime: {e}")))?;
    let explicit = cli.config.as_deref();
    let config = crate::config::locate(explicit);
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => commands::run::run(&config).await,
            Command::Once => commands::run::once(&config).await,
            Command::Doctor { retry_pin } => {
                commands::doctor::doctor(&config, retry_pin.as_deref()).await
            }
            Command::Check => commands::check::check(&config),
            Command::Wait { targets, timeout } => {
                tokio::task::block_in_place(|| commands::wait::wait(&config, &targets, timeout))
            }
            Command::Audit(AuditCommand::Verify { public_key, files }) => {
                commands::audit::verify(&config, &files, public_key.as_deref())
            }
            Command::Audit(AuditCommand::Export {
                since,
                until,
                files,
            }) => commands::audit::export(&config, &files, since.as_deref(), until.as_deref()),
            Command::Reload { pid } => {
                tokio::task::block_in_place(|| commands::reload::reload(&config, pid))
            }
            Command::Slots {
                module,
                init_args,
                json,
            } => {
                commands::slots::slots(module.as_deref(), init_args.as_deref(), &config, json).await
            }
            Command::GenerateAssets { out } => commands::assets::generate(&out),
            Command::Completions { shell } => commands::assets::completions(shell),
            Command::Fetch {
                bytes,
                output,
                source,
            } => {
                commands::fetch::fetch(
                    &config,
                    explicit.is_some(),
                    bytes,
                    output.as_deref(),
                    source.as_deref(),
                )
                .await
            }
            Command::Migrate { file, write } => {
                let file = file.unwrap_or_else(|| match explicit {
                    Some(path) => path.to_path_buf(),
                    None => PathBuf::from(crate::config::legacy::DEFAULT_PATH),
                });
                commands::migrate::migrate(&file, write.as_deref()).await
            }
            Command::Demo { rounds, module } => {
                let dir = demo_dir.ok_or_else(|| Error::Failed("demo folder missing".into()))?;
                commands::demo::demo(dir, rounds, &module).await
            }
            Command::Simulator {
                listen,
                ca_out,
                plain_http,
                block_unit,
            } => {
                commands::simulator::simulator(listen, ca_out.as_deref(), plain_http, &block_unit)
                    .await
            }
        }
    });
    // A PKCS#11 call that never returned must not hold the process: its thread is left behind.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}
