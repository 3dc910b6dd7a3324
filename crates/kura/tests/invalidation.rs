//! The invalidation API on both stores: one key, many keys, an entity,
//! patterns (escaped, counted).

mod support;

use kura::{Kind, Status};
use support::{Backend, Db, TestDb, cleanup};

async fn one_many_and_entity(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    for i in 0..5 {
        db.put(&format!("u{i}"), "x");
    }
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    let settings = cache.aside(Kind::new("settings"), Db(db.clone()));
    let prefs = cache.aside(Kind::new("preferences"), Db(db.clone()));
    for i in 0..5 {
        profiles.get(&format!("u{i}")).await.unwrap();
    }
    settings.get("u0").await.unwrap();
    prefs.get("u0").await.unwrap();

    let r = cache.invalidate(Kind::new("profile"), "u1").await.unwrap();
    assert_eq!((r.deleted, r.deferred), (1, false));
    let r = cache
        .invalidate_many(Kind::new("profile"), &["u2", "u3", "nope"])
        .await
        .unwrap();
    assert_eq!(r.deleted, 2);
    let r = cache
        .invalidate_entity(
            "u0",
            &[
                Kind::new("profile"),
                Kind::new("settings"),
                Kind::new("preferences"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.deleted, 3);
    assert_eq!(profiles.get("u4").await.unwrap().status(), Status::Hit);
    for id in ["u0", "u1", "u2", "u3"] {
        assert_eq!(
            profiles.get(id).await.unwrap().status(),
            Status::Miss,
            "{id}"
        );
    }
    assert_eq!(settings.get("u0").await.unwrap().status(), Status::Miss);
    cleanup(&ns).await;
}

async fn patterns_count_and_never_widen(b: Backend) {
    let (cache, ns) = b.cache();
    let db = TestDb::new();
    let ids: Vec<String> = (0..250).map(|i| format!("user-{i:03}")).collect();
    for id in &ids {
        db.put(id, "x");
    }
    let profiles = cache.aside(Kind::new("profile"), Db(db.clone()));
    profiles.get_many(&ids).await.unwrap();
    let settings = cache.aside(Kind::new("settings"), Db(db.clone()));
    settings.get("user-001").await.unwrap();

    // More than one SCAN batch of 100 matches.
    assert_eq!(
        cache
            .invalidate_pattern(Kind::new("profile"), "user-1*")
            .await
            .unwrap(),
        100
    );
    assert_eq!(
        cache
            .invalidate_glob(&format!("{ns}:profile:user-0?0"), &[Kind::new("profile")])
            .await
            .unwrap(),
        10
    );
    // Glob metacharacters in the literal parts cannot widen a delete.
    assert!(
        cache
            .invalidate_glob("*", &[Kind::new("profile")])
            .await
            .is_err()
    );
    assert!(
        cache
            .invalidate_glob(&format!("{ns}:*"), &[Kind::new("profile")])
            .await
            .is_err()
    );
    assert!(
        cache
            .invalidate_pattern(Kind::new("profile"), "[unclosed")
            .await
            .is_err()
    );
    assert_eq!(
        cache.invalidate_all(Kind::new("profile")).await.unwrap(),
        140
    );
    assert_eq!(cache.invalidate_all(Kind::new("profile")).await.unwrap(), 0);
    assert_eq!(
        settings.get("user-001").await.unwrap().status(),
        Status::Hit,
        "other type kept"
    );
    cleanup(&ns).await;
}

both_stores!(one_many_and_entity, patterns_count_and_never_widen);

with_near_cache!(one_many_and_entity, patterns_count_and_never_widen);
