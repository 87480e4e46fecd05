//! The settings that change without a restart: tokens (`[auth]`), the TLS
//! certificate (`[tls]`) and rate limits (`[rate_limit]`).
//!
//! They live in one [`LiveSettings`] handle, read by the HTTP layer on every
//! request and by the listener on every new connection, and replaced as a
//! whole on SIGHUP: a request sees either the old settings or the new ones,
//! never a mix. A reload that fails validation changes nothing.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::auth::Tokens;
use crate::config::{Config, ConfigError, RateLimitConfig};
use crate::tls::TlsError;

/// One consistent set of the reloadable settings.
#[derive(Debug)]
pub struct Security {
    /// `None`: authentication is off (no tokens configured).
    pub tokens: Option<Tokens>,
    pub metrics_public: bool,
    /// `None`: no rate limiting.
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Why a configuration could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("a reload cannot turn TLS {0}: the listener's protocol is fixed at startup; restart")]
    TlsToggled(&'static str),
    #[error("no configuration file was given at startup, so there is nothing to reload")]
    NoFile,
}

impl Security {
    /// Builds the settings of a validated configuration, reusing `previous`'s
    /// rate limiter when its limits did not change (so a reload does not hand
    /// every client a fresh burst).
    fn build(config: &Config, previous: Option<&Security>) -> Result<Security, SecurityError> {
        let tokens = config.auth_enabled().then(|| {
            Tokens::new(config.auth.tokens.iter().filter_map(|token| {
                // Validation has checked every hash; none is skipped here.
                let digest = crate::auth::parse_hash(&token.hash).ok()?;
                Some((
                    digest,
                    crate::auth::Principal::new(
                        token.name.clone(),
                        token.roles.iter().copied(),
                        token.aggregates.clone(),
                        token.projections.clone(),
                    ),
                ))
            }))
        });
        let rate_limit = match previous.and_then(|p| p.rate_limit.as_ref()) {
            Some(limiter) if limiter.settings == config.rate_limit => Some(limiter.clone()),
            _ => RateLimiter::new(&config.rate_limit).map(Arc::new),
        };
        let tls = match config.tls_paths() {
            Ok(Some((cert, key))) => Some(crate::tls::server_config(&cert, &key)?),
            Ok(None) => None,
            Err((key, reason)) => {
                return Err(ConfigError {
                    problems: vec![crate::config::ConfigProblem {
                        key: key.to_owned(),
                        reason,
                    }],
                }
                .into());
            }
        };
        Ok(Security {
            tokens,
            metrics_public: config.auth.metrics_public,
            rate_limit,
            tls,
        })
    }
}

/// A keyed token bucket (GCRA) per token name or client address.
#[derive(Debug)]
pub struct RateLimiter {
    settings: RateLimitConfig,
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

impl RateLimiter {
    /// `None` when the settings turn limiting off.
    fn new(settings: &RateLimitConfig) -> Option<RateLimiter> {
        if settings.requests_per_second <= 0.0 || !settings.requests_per_second.is_finite() {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / settings.requests_per_second);
        let burst = NonZeroU32::new(settings.burst)?;
        let quota = Quota::with_period(period)?.allow_burst(burst);
        Some(RateLimiter {
            settings: settings.clone(),
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            clock: DefaultClock::default(),
        })
    }

    /// Takes one request from `key`'s bucket, or says how long until one is
    /// available.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets keys whose buckets are full again, so per-address keys do not
    /// accumulate without bound.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// The reloadable settings, shared by the HTTP layer and the listener.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: ArcSwap<Security>,
    /// The configuration file, re-read on reload.
    path: Option<PathBuf>,
    /// The configuration at startup, to tell which changes need a restart.
    startup: Config,
}

impl LiveSettings {
    /// The settings of the startup configuration.
    pub fn new(config: &Config, path: Option<PathBuf>) -> Result<LiveSettings, SecurityError> {
        let security = Security::build(config, None)?;
        Ok(LiveSettings {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(security),
                path,
                startup: config.clone(),
            }),
        })
    }

    /// The settings in force now.
    pub fn current(&self) -> Arc<Security> {
        self.inner.current.load_full()
    }

    /// Re-reads the configuration file (and environment) and applies its
    /// `[auth]`, `[tls]` and `[rate_limit]`. Any problem leaves the settings
    /// as they were. Returns the sections whose changes need a restart.
    pub fn reload(&self) -> Result<Vec<&'static str>, SecurityError> {
        let path = self.inner.path.as_deref().ok_or(SecurityError::NoFile)?;
        let config = Config::load(Some(path))?;
        let previous = self.current();
        let security = Security::build(&config, Some(&previous))?;
        match (previous.tls.is_some(), security.tls.is_some()) {
            (false, true) => return Err(SecurityError::TlsToggled("on")),
            (true, false) => return Err(SecurityError::TlsToggled("off")),
            _ => {}
        }
        self.inner.current.store(Arc::new(security));
        let startup = &self.inner.startup;
        let ignored = [
            ("http", config.http != startup.http),
            ("storage", config.storage != startup.storage),
            ("domain", config.domain != startup.domain),
            ("log", config.log != startup.log),
            ("command", config.command != startup.command),
            ("query", config.query != startup.query),
            ("projections", config.projections != startup.projections),
            ("logging", config.logging != startup.logging),
        ]
        .into_iter()
        .filter_map(|(section, changed)| changed.then_some(section))
        .collect();
        Ok(ignored)
    }

    /// Forgets idle rate-limit keys every `every` until `stop`.
    pub async fn forget_idle_keys(
        self,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Some(limiter) = &self.current().rate_limit {
                limiter.forget_idle();
            }
        }
    }
}
