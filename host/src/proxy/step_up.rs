//! Which `step_up` caveats count: a token's holder can append any caveat without the master
//! key, `step_up` included, so a `step_up_at` on a grant is only the holder's word. It counts as
//! evidence of a fresh second factor (it lets a policy's `requires_step_up` pass without a
//! person, and it is what policies read as `capability.step_up_at`) only when the token tree's
//! mint recorded a step-up (`admin/tokens.rs`, before the token left the gateway).
//!
//! A mint's record exists before its token does, so an answer, found or not, never changes:
//! both are remembered (bounded). This module must never confirm a step-up the store did not
//! record, and a store that cannot answer confirms none (the call goes to a person).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::capability::Grant;
use crate::store::Store;

/// Token trees remembered; past it the memory starts again.
const REMEMBERED: usize = 16_384;

/// See the module documentation.
pub struct StepUps {
    store: Arc<dyn Store>,
    /// `(tenant, root_jti)` → the step-up its mint recorded, if any.
    known: Mutex<HashMap<(String, String), Option<i64>>>,
}

impl StepUps {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps the grant's `step_up_at` only when its tree's mint recorded a step-up, and then
    /// no later than that record (a holder may only make it older).
    pub async fn confirm(&self, grant: &mut Grant) {
        let Some(claimed) = grant.step_up_at else {
            return;
        };
        let minted = self.minted(&grant.tenant, &grant.root_jti).await;
        grant.step_up_at = minted.map(|at| at.min(claimed));
    }

    async fn minted(&self, tenant: &str, root_jti: &str) -> Option<i64> {
        let key = (tenant.to_owned(), root_jti.to_owned());
        if let Some(known) = self.known.lock().ok().and_then(|k| k.get(&key).copied()) {
            return known;
        }
        match self.store.minted_step_up(tenant, root_jti).await {
            Ok(found) => {
                if let Ok(mut k) = self.known.lock() {
                    if k.len() >= REMEMBERED {
                        k.clear();
                    }
                    k.insert(key, found);
                }
                found
            }
            Err(e) => {
                tracing::warn!(tenant, error = %e, "step-up: the store could not confirm a token's step-up; none counted");
                None
            }
        }
    }
}
