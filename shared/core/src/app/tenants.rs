//! Per-tenant limits at submit: an owner's limits (the configured defaults under what an
//! operator set for it in the table), and one token of its submit bucket spent per request.
//! The in-flight limit itself is applied by dispatch, through the hold each job carries
//! (`app::holds`).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::domain::job::Millis;
use crate::domain::tenant::TenantLimits;
use crate::ports::{Clock, StoreError, TenantStore};

/// How long an owner's limits are kept in memory before the table is read again: an
/// operator's change takes effect within this, and a busy owner costs one read a minute per
/// warm instance rather than one per request.
pub const LIMITS_CACHED_MS: Millis = 60_000;
/// Owners whose limits one instance keeps in memory; past it the memory starts over.
const CACHED_OWNERS: usize = 10_000;

/// Why a submit may not go ahead now.
#[derive(Debug)]
pub enum Refused {
    /// Over the submit rate: a token is back after this many milliseconds.
    Rate {
        wait_ms: Millis,
    },
    Store(StoreError),
}

impl From<StoreError> for Refused {
    fn from(err: StoreError) -> Self {
        Self::Store(err)
    }
}

pub struct Tenants {
    pub store: Arc<dyn TenantStore>,
    pub defaults: TenantLimits,
    pub clock: Arc<dyn Clock>,
    cached: Mutex<HashMap<String, (TenantLimits, Millis)>>,
}

impl Tenants {
    pub fn new(store: Arc<dyn TenantStore>, defaults: TenantLimits, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            defaults,
            clock,
            cached: Mutex::new(HashMap::new()),
        }
    }

    /// `owner`'s limits: the defaults under its overrides.
    pub async fn limits(&self, owner: &str) -> Result<TenantLimits, StoreError> {
        let now = self.clock.now_ms();
        if let Some((limits, at)) = self.cached.lock().unwrap().get(owner) {
            if now - at < LIMITS_CACHED_MS {
                return Ok(*limits);
            }
        }
        let limits = match self.store.overrides(owner).await? {
            Some(overrides) => self.defaults.with(&overrides),
            None => self.defaults,
        };
        let mut cached = self.cached.lock().unwrap();
        if cached.len() >= CACHED_OWNERS {
            cached.clear();
        }
        cached.insert(owner.to_string(), (limits, now));
        Ok(limits)
    }

    /// Spends one of `owner`'s submit tokens; a batch is one request. Returns the owner's
    /// limits, for the holds of the jobs it submits.
    pub async fn admit(&self, owner: &str) -> Result<TenantLimits, Refused> {
        let limits = self.limits(owner).await?;
        if let Some(rate) = limits.rate() {
            let now = self.clock.now_ms();
            if let Err(wait_ms) = self.store.spend_submit(owner, &rate, now).await? {
                tracing::info!(owner, wait_ms, "submit refused: over the owner's rate");
                crate::metrics::rate_limited();
                return Err(Refused::Rate { wait_ms });
            }
        }
        Ok(limits)
    }
}
