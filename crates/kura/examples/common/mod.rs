// Shared by the examples: a tiny in-memory "database" and the store choice.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kura::{QueueStore, Versioned};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub user_id: String,
    pub name: String,
    pub version: u64,
}

impl Versioned for Profile {
    fn version(&self) -> u64 {
        self.version
    }
}

/// Stands in for the SQL database: rows with a version every update bumps.
#[derive(Clone, Default)]
pub struct Db(pub Arc<Mutex<HashMap<String, Profile>>>);

impl Db {
    pub fn upsert(&self, user_id: &str, name: &str) -> Profile {
        let mut rows = self.0.lock().unwrap();
        let version = rows.get(user_id).map_or(1, |p| p.version + 1);
        let p = Profile {
            user_id: user_id.into(),
            name: name.into(),
            version,
        };
        rows.insert(user_id.into(), p.clone());
        p
    }
}

impl kura::Source for Db {
    type Value = Profile;
    type Error = std::convert::Infallible;

    async fn load(&self, id: &str) -> Result<Option<Profile>, Self::Error> {
        println!("  (database read of {id})");
        Ok(self.0.lock().unwrap().get(id).cloned())
    }

    async fn load_many(&self, ids: &[String]) -> Result<Vec<(String, Profile)>, Self::Error> {
        println!("  (database read of {} rows in one query)", ids.len());
        let rows = self.0.lock().unwrap();
        Ok(ids
            .iter()
            .filter_map(|id| rows.get(id).map(|p| (id.clone(), p.clone())))
            .collect())
    }
}

/// Redis when `REDIS_URL` is set, otherwise the embedded memory store.
pub fn store() -> Arc<dyn QueueStore> {
    match std::env::var("REDIS_URL") {
        Ok(url) => Arc::new(kura::store::RedisStore::open(&url).expect("REDIS_URL")),
        Err(_) => Arc::new(kura::store::MemoryStore::new()),
    }
}
