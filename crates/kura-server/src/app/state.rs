//! The router's state: every feature's part, each handed to the handlers
//! that ask for it ([`FromRef`]), so that no feature knows this type.

use std::sync::Arc;

use axum::extract::FromRef;

use crate::auth::Gate;
use crate::http::ratelimit::Limits;
use crate::ops::Ops;
use crate::profiles::ProfileService;
use crate::tokens::Tokens;
use crate::userdata::UserData;

/// The state of the router: one reference count per request, then one
/// per part a handler takes.
#[derive(Debug, Clone)]
pub struct AppState(pub Arc<Shared>);

/// What the handlers share.
#[derive(Debug)]
pub struct Shared {
    /// Profiles.
    pub profiles: Arc<ProfileService>,
    /// Settings and preferences.
    pub userdata: Arc<UserData>,
    /// Revocation checks and sessions.
    pub tokens: Tokens,
    /// Token verification and admission.
    pub gate: Arc<Gate>,
    /// Health, metrics, the OpenAPI document, the feed.
    pub ops: Arc<Ops>,
    /// The rate limits (`None`: off).
    pub limits: Option<Arc<Limits>>,
}

impl FromRef<AppState> for Arc<ProfileService> {
    fn from_ref(s: &AppState) -> Self {
        s.0.profiles.clone()
    }
}

impl FromRef<AppState> for Arc<UserData> {
    fn from_ref(s: &AppState) -> Self {
        s.0.userdata.clone()
    }
}

impl FromRef<AppState> for Tokens {
    fn from_ref(s: &AppState) -> Self {
        s.0.tokens.clone()
    }
}

impl FromRef<AppState> for Arc<Gate> {
    fn from_ref(s: &AppState) -> Self {
        s.0.gate.clone()
    }
}

impl FromRef<AppState> for Arc<Ops> {
    fn from_ref(s: &AppState) -> Self {
        s.0.ops.clone()
    }
}
