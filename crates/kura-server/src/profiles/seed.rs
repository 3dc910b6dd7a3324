//! Deterministic demo and benchmark data: Japanese names in UTF-8
//! (`太郎0` / `山田`), `user<N>@example.jp`, `090-xxxx-xxxx` phone numbers
//! and `last_login` spread over the last 30 days.
//!
//! The same `--seed` and count give the same user ids and fields (only the
//! times move with the clock), so benchmark id lists can be regenerated.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use sqlx::{QueryBuilder, Sqlite};

use super::model::Fields;
use crate::db::sql::{hyphenated, ts};
use crate::db::{Db, DbError};

/// A seed row: the editable fields plus the ids and times a generator picks.
#[derive(Debug, Clone)]
pub struct SeedRow {
    /// Row id.
    pub id: Uuid,
    /// User id.
    pub user_id: Uuid,
    /// Editable fields.
    pub fields: Fields,
    /// Last login.
    pub last_login: DateTime<Utc>,
    /// Creation time (also the first `updated_at`).
    pub created_at: DateTime<Utc>,
}

impl Db {
    /// Inserts `rows` in one transaction (PostgreSQL: `UNNEST` arrays;
    /// SQLite: multi-row `INSERT`s), skipping users that already have a
    /// profile. Returns how many rows were inserted.
    ///
    /// # Errors
    ///
    /// [`DbError`] on a database failure (nothing is inserted then).
    pub async fn insert_seed(&self, rows: &[SeedRow]) -> Result<u64, DbError> {
        let mut inserted = 0;
        match self {
            Db::Postgres(p) => {
                let mut tx = p.begin().await?;
                for chunk in rows.chunks(10_000) {
                    let col = |f: fn(&SeedRow) -> Option<String>| -> Vec<Option<String>> {
                        chunk.iter().map(f).collect()
                    };
                    inserted += sqlx::query(
                        "INSERT INTO profiles (id, user_id, first_name, last_name, name, email, \
                         phone, address, last_login, created_at, updated_at, version) \
                         SELECT id, user_id, first_name, last_name, name, email, phone, address, \
                         last_login, created_at, created_at, 1 FROM UNNEST(\
                         $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], \
                         $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[]) \
                         AS t(id, user_id, first_name, last_name, name, email, phone, address, \
                         last_login, created_at) \
                         ON CONFLICT (user_id) DO NOTHING",
                    )
                    .bind(chunk.iter().map(|r| r.id).collect::<Vec<_>>())
                    .bind(chunk.iter().map(|r| r.user_id).collect::<Vec<_>>())
                    .bind(col(|r| r.fields.first_name.clone()))
                    .bind(col(|r| r.fields.last_name.clone()))
                    .bind(col(|r| r.fields.name.clone()))
                    .bind(col(|r| r.fields.email.clone()))
                    .bind(col(|r| r.fields.phone.clone()))
                    .bind(col(|r| r.fields.address.clone()))
                    .bind(chunk.iter().map(|r| r.last_login).collect::<Vec<_>>())
                    .bind(chunk.iter().map(|r| r.created_at).collect::<Vec<_>>())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                }
                tx.commit().await?;
            }
            Db::Sqlite(p) => {
                let mut tx = p.begin().await?;
                // 11 parameters per row, under SQLite's 32,766 per statement.
                for chunk in rows.chunks(2_000) {
                    let mut qb = QueryBuilder::<Sqlite>::new(
                        "INSERT INTO profiles (id, user_id, first_name, last_name, name, email, \
                         phone, address, last_login, created_at, updated_at, version) ",
                    );
                    qb.push_values(chunk, |mut b, r| {
                        let created = ts(r.created_at);
                        b.push_bind(hyphenated(r.id))
                            .push_bind(hyphenated(r.user_id))
                            .push_bind(r.fields.first_name.clone())
                            .push_bind(r.fields.last_name.clone())
                            .push_bind(r.fields.name.clone())
                            .push_bind(r.fields.email.clone())
                            .push_bind(r.fields.phone.clone())
                            .push_bind(r.fields.address.clone())
                            .push_bind(ts(r.last_login))
                            .push_bind(created.clone())
                            .push_bind(created)
                            .push("1");
                    });
                    qb.push(" ON CONFLICT (user_id) DO NOTHING");
                    inserted += qb.build().execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
            }
        }
        Ok(inserted)
    }
}

const FIRST: &[&str] = &[
    "太郎",
    "花子",
    "一郎",
    "次郎",
    "三郎",
    "美咲",
    "健太",
    "陽菜",
    "翔太",
    "さくら",
    "大輝",
    "結衣",
    "蓮",
    "葵",
    "悠真",
    "凛",
];

const LAST: &[&str] = &[
    "山田", "佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "中村", "小林", "加藤", "吉田", "山本",
];

const PLACES: &[&str] = &[
    "東京都千代田区丸の内",
    "大阪府大阪市北区梅田",
    "愛知県名古屋市中区栄",
    "福岡県福岡市博多区博多駅前",
    "北海道札幌市中央区北一条西",
    "京都府京都市下京区烏丸通",
    "神奈川県横浜市西区みなとみらい",
    "宮城県仙台市青葉区一番町",
];

/// How far back `last_login` goes.
const LOGIN_SPREAD: Duration = Duration::from_secs(30 * 86_400);

/// Rows per database round trip.
const CHUNK: usize = 10_000;

fn row(rng: &mut StdRng, i: u64, now: DateTime<Utc>) -> SeedRow {
    let id = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
    let user_id = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
    let first = format!("{}{i}", FIRST[rng.random_range(0..FIRST.len())]);
    let last = LAST[rng.random_range(0..LAST.len())];
    let phone = format!(
        "090-{:04}-{:04}",
        rng.random_range(0..10_000u32),
        rng.random_range(0..10_000u32)
    );
    let address = format!(
        "{}{}-{}-{}",
        PLACES[rng.random_range(0..PLACES.len())],
        rng.random_range(1..10u32),
        rng.random_range(1..30u32),
        rng.random_range(1..20u32)
    );
    let ago = Duration::from_secs(rng.random_range(0..LOGIN_SPREAD.as_secs()));
    let created_ago = LOGIN_SPREAD + Duration::from_secs(rng.random_range(0..365 * 86_400));
    SeedRow {
        id,
        user_id,
        fields: Fields {
            name: Some(format!("{last} {first}")),
            first_name: Some(first),
            last_name: Some(last.to_owned()),
            email: Some(format!("user{i}@example.jp")),
            phone: Some(phone),
            address: Some(address),
        },
        last_login: now - ago,
        created_at: now - created_ago,
    }
}

/// Generates `n` rows from `seed`.
#[must_use]
pub fn generate(n: u64, seed: u64) -> Vec<SeedRow> {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = Utc::now();
    (0..n).map(|i| row(&mut rng, i, now)).collect()
}

/// What a seeding run did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Seeded {
    /// The user ids generated, in order (inserted or already present).
    pub user_ids: Vec<Uuid>,
    /// Rows actually inserted (users already present are skipped).
    pub inserted: u64,
}

/// Generates and inserts `n` profiles, `on_chunk` called with the rows done
/// so far.
///
/// # Errors
///
/// [`DbError`] when an insert fails.
pub async fn seed(db: &Db, n: u64, seed: u64, on_chunk: impl Fn(u64)) -> Result<Seeded, DbError> {
    let rows = generate(n, seed);
    let mut inserted = 0;
    let mut done = 0;
    for chunk in rows.chunks(CHUNK) {
        inserted += db.insert_seed(chunk).await?;
        done += chunk.len() as u64;
        on_chunk(done);
    }
    Ok(Seeded {
        user_ids: rows.iter().map(|r| r.user_id).collect(),
        inserted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_japanese() {
        let a = generate(50, 7);
        let b = generate(50, 7);
        assert_eq!(
            a.iter().map(|r| r.user_id).collect::<Vec<_>>(),
            b.iter().map(|r| r.user_id).collect::<Vec<_>>()
        );
        assert_ne!(generate(1, 8)[0].user_id, a[0].user_id);
        let r = &a[3];
        assert!(r.fields.first_name.as_deref().unwrap().ends_with('3'));
        assert_eq!(r.fields.email.as_deref(), Some("user3@example.jp"));
        let phone = r.fields.phone.as_deref().unwrap();
        assert!(phone.starts_with("090-") && phone.len() == 13, "{phone}");
        assert!(LAST.contains(&r.fields.last_name.as_deref().unwrap()));
        let age = Utc::now() - r.last_login;
        assert!(age.num_days() <= 30);
        assert!(crate::profiles::model::Fields::validate(&r.fields).is_ok());
    }
}
