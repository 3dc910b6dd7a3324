//! The profile and the write requests, with their validation rules.
//!
//! [`Profile`] is both the HTTP representation and the cached value: the
//! cache holds exactly the JSON a `GET` returns (plus the library's `_v` and
//! `cached_at` header), so a hit is sent without serializing again.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A user profile as stored and as returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Profile {
    /// Row id.
    pub id: Uuid,
    /// The user this profile belongs to (the JWT `sub`).
    pub user_id: Uuid,
    /// Given name.
    pub first_name: Option<String>,
    /// Family name.
    pub last_name: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// E-mail address.
    pub email: Option<String>,
    /// Phone number.
    pub phone: Option<String>,
    /// Postal address.
    pub address: Option<String>,
    /// Creation time, RFC 3339 UTC.
    pub created_at: DateTime<Utc>,
    /// Last update time, RFC 3339 UTC.
    pub updated_at: DateTime<Utc>,
    /// Row version: every update increases it by one.
    pub version: i64,
}

impl kura::Versioned for Profile {
    fn version(&self) -> u64 {
        u64::try_from(self.version).unwrap_or(0)
    }
}

impl Profile {
    /// This profile with `patch` applied to its editable fields (version
    /// and times unchanged).
    #[must_use]
    pub fn with_patch(&self, patch: &ProfilePatch) -> Profile {
        let mut p = self.clone();
        for (field, v) in [
            (&mut p.first_name, &patch.first_name),
            (&mut p.last_name, &patch.last_name),
            (&mut p.name, &patch.name),
            (&mut p.email, &patch.email),
            (&mut p.phone, &patch.phone),
            (&mut p.address, &patch.address),
        ] {
            if let Some(v) = v {
                field.clone_from(v);
            }
        }
        p
    }

    /// Whether the editable fields of both are equal.
    #[must_use]
    pub fn same_fields(&self, other: &Profile) -> bool {
        self.first_name == other.first_name
            && self.last_name == other.last_name
            && self.name == other.name
            && self.email == other.email
            && self.phone == other.phone
            && self.address == other.address
    }
}

/// The editable fields, shared by creation and update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// Given name.
    pub first_name: Option<String>,
    /// Family name.
    pub last_name: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// E-mail address.
    pub email: Option<String>,
    /// Phone number.
    pub phone: Option<String>,
    /// Postal address.
    pub address: Option<String>,
}

/// `POST /api/v1/profiles`: a new profile.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProfile {
    /// The user the profile belongs to.
    pub user_id: Uuid,
    /// Given name.
    #[serde(default)]
    pub first_name: Option<String>,
    /// Family name.
    #[serde(default)]
    pub last_name: Option<String>,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// E-mail address.
    #[serde(default)]
    pub email: Option<String>,
    /// Phone number.
    #[serde(default)]
    pub phone: Option<String>,
    /// Postal address.
    #[serde(default)]
    pub address: Option<String>,
}

impl NewProfile {
    /// The editable fields.
    #[must_use]
    pub fn fields(&self) -> Fields {
        Fields {
            first_name: self.first_name.clone(),
            last_name: self.last_name.clone(),
            name: self.name.clone(),
            email: self.email.clone(),
            phone: self.phone.clone(),
            address: self.address.clone(),
        }
    }

    /// Checks every given field.
    ///
    /// # Errors
    ///
    /// A message naming the first invalid field.
    pub fn validate(&self) -> Result<(), String> {
        self.fields().validate()
    }
}

/// `PUT /api/v1/profiles/{user_id}`: any subset of the editable fields.
///
/// A field left out is unchanged; a field set to `null` is cleared.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    /// Given name.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub first_name: Option<Option<String>>,
    /// Family name.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub last_name: Option<Option<String>>,
    /// Display name.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    /// E-mail address.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub email: Option<Option<String>>,
    /// Phone number.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub phone: Option<Option<String>>,
    /// Postal address.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub address: Option<Option<String>>,
}

/// A field that is present: `Some(None)` for `null`, `Some(Some(v))` for a
/// value (absent fields take the `default`, `None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

impl ProfilePatch {
    /// The columns to set, in a fixed order.
    #[must_use]
    pub fn assignments(&self) -> Vec<(&'static str, Option<&str>)> {
        let all = [
            ("first_name", &self.first_name),
            ("last_name", &self.last_name),
            ("name", &self.name),
            ("email", &self.email),
            ("phone", &self.phone),
            ("address", &self.address),
        ];
        all.into_iter()
            .filter_map(|(col, v)| v.as_ref().map(|v| (col, v.as_deref())))
            .collect()
    }

    /// Whether the patch changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.assignments().is_empty()
    }

    /// Checks every given field.
    ///
    /// # Errors
    ///
    /// A message naming the first invalid field.
    pub fn validate(&self) -> Result<(), String> {
        for (col, v) in self.assignments() {
            if let Some(v) = v {
                check_field(col, v)?;
            }
        }
        Ok(())
    }
}

impl Fields {
    /// Checks every given field.
    ///
    /// # Errors
    ///
    /// A message naming the first invalid field.
    pub fn validate(&self) -> Result<(), String> {
        for (col, v) in [
            ("first_name", &self.first_name),
            ("last_name", &self.last_name),
            ("name", &self.name),
            ("email", &self.email),
            ("phone", &self.phone),
            ("address", &self.address),
        ] {
            if let Some(v) = v {
                check_field(col, v)?;
            }
        }
        Ok(())
    }
}

/// Longest value per field, in characters.
fn max_chars(field: &str) -> usize {
    match field {
        "email" => 254,
        "phone" => 32,
        "address" => 500,
        _ => 100,
    }
}

/// The rule of one field.
fn check_field(field: &str, v: &str) -> Result<(), String> {
    let n = v.chars().count();
    if n > max_chars(field) {
        return Err(format!(
            "{field}: at most {} characters, got {n}",
            max_chars(field)
        ));
    }
    let allows_newline = field == "address";
    if v.chars()
        .any(|c| c.is_control() && !(allows_newline && c == '\n'))
    {
        return Err(format!("{field}: control characters are not allowed"));
    }
    match field {
        "email" if !is_email(v) => Err(format!("email: {v:?} is not an e-mail address")),
        "phone" if !is_phone(v) => Err(format!(
            "phone: {v:?} is not a phone number (digits, spaces, '-', '(', ')', optional leading '+')"
        )),
        "first_name" | "last_name" | "name" if v.trim().is_empty() => {
            Err(format!("{field}: must not be blank (use null to clear it)"))
        }
        _ => Ok(()),
    }
}

/// A deliberately plain check: one `@`, a non-empty local part, a dotted
/// domain, no spaces.
fn is_email(v: &str) -> bool {
    let Some((local, domain)) = v.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !v.chars().any(char::is_whitespace)
}

fn is_phone(v: &str) -> bool {
    let body = v.strip_prefix('+').unwrap_or(v);
    let digits = body.chars().filter(char::is_ascii_digit).count();
    (7..=20).contains(&digits)
        && body
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '-' | ' ' | '(' | ')'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_distinguishes_absent_null_and_value() {
        let p: ProfilePatch =
            serde_json::from_str(r#"{"first_name":"太郎","phone":null}"#).unwrap();
        assert_eq!(
            p.assignments(),
            vec![("first_name", Some("太郎")), ("phone", None)]
        );
        assert!(
            serde_json::from_str::<ProfilePatch>("{}")
                .unwrap()
                .is_empty()
        );
        assert!(serde_json::from_str::<ProfilePatch>(r#"{"role":"admin"}"#).is_err());
        assert!(serde_json::from_str::<ProfilePatch>(r#"{"name":5}"#).is_err());
    }

    #[test]
    fn field_rules() {
        assert!(check_field("email", "taro@example.jp").is_ok());
        for bad in ["taro", "@x.jp", "a@b", "a b@x.jp", "a@.jp", "a@x.jp."] {
            assert!(check_field("email", bad).is_err(), "{bad}");
        }
        assert!(check_field("phone", "090-1234-5678").is_ok());
        assert!(check_field("phone", "+81 90 1234 5678").is_ok());
        assert!(check_field("phone", "call me").is_err());
        assert!(check_field("phone", "12").is_err());
        assert!(check_field("name", &"x".repeat(101)).is_err());
        assert!(check_field("name", &"山".repeat(100)).is_ok());
        assert!(check_field("name", "  ").is_err());
        assert!(check_field("address", "東京都\n千代田区").is_ok());
        assert!(check_field("name", "a\u{0}b").is_err());
    }
}
