//! Cache administration (the `admin` role): warming, invalidation by
//! user, tag or type, and hit-rate metrics ([`routes`]). It has no state or
//! table of its own: each route is one call of
//! [`crate::profiles::ProfileService`].

pub mod routes;
