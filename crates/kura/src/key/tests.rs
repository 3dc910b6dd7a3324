//! Key building, validation and patterns.
use super::*;

const PROFILE: Kind = Kind::new("profile");
const DOCUMENT_META: Kind = Kind::new("document_meta")
    .with_segment("document")
    .with_suffix("metadata");

fn kb() -> KeyBuilder {
    KeyBuilder::new("cache", false).unwrap()
}

#[test]
fn stale_key_from_the_value_key() {
    for tags in [false, true] {
        let e = KeyBuilder::new("cache", tags)
            .unwrap()
            .entry(&DOCUMENT_META, "d1")
            .unwrap();
        assert_eq!(stale_key_of(&e.value).as_deref(), Some(e.stale.as_str()));
    }
    assert_eq!(stale_key_of("cache:~lock:warm"), None);
    assert_eq!(stale_key_of("nocolon"), None);
}

#[test]
fn seed_key_shapes() {
    let k = kb();
    assert_eq!(k.value_key(&PROFILE, "u1").unwrap(), "cache:profile:u1");
    assert_eq!(
        k.value_key(&DOCUMENT_META, "d1").unwrap(),
        "cache:document:d1:metadata"
    );
    let e = k.entry(&PROFILE, "u1").unwrap();
    assert_eq!(e.lease, "cache:~l:profile:u1");
    assert_eq!(e.stale, "cache:~s:profile:u1");
    assert_eq!(e.absent, "cache:~n:profile:u1");
    let tagged = KeyBuilder::new("cache", true).unwrap();
    assert_eq!(
        tagged.value_key(&PROFILE, "u1").unwrap(),
        "cache:profile:{u1}"
    );
}

#[test]
fn bad_ids_are_rejected() {
    let k = kb();
    for (id, err) in [
        ("", KeyError::Empty),
        ("a b", KeyError::ForbiddenChar(' ')),
        ("a\tb", KeyError::ForbiddenChar('\t')),
        ("a\nb", KeyError::ForbiddenChar('\n')),
        ("a*", KeyError::ForbiddenChar('*')),
        ("a?", KeyError::ForbiddenChar('?')),
        ("[a]", KeyError::ForbiddenChar('[')),
        ("a\\b", KeyError::ForbiddenChar('\\')),
        ("a:b", KeyError::ForbiddenChar(':')),
        ("{a}", KeyError::ForbiddenChar('{')),
        ("a\u{7f}", KeyError::ForbiddenChar('\u{7f}')),
    ] {
        assert_eq!(k.value_key(&PROFILE, id), Err(err), "{id:?}");
    }
    let long = "x".repeat(MAX_ID_LEN + 1);
    assert_eq!(
        k.value_key(&PROFILE, &long),
        Err(KeyError::TooLong(MAX_ID_LEN + 1))
    );
    assert!(k.value_key(&PROFILE, &"x".repeat(MAX_ID_LEN)).is_ok());
    assert!(k.value_key(&PROFILE, "山田-太郎").is_ok());
    assert!(KeyBuilder::new("Cache", false).is_err());
    assert!(KeyBuilder::new("ca*", false).is_err());
}

#[test]
fn pattern_escapes_literals_and_confirms_keys() {
    let k = kb();
    let p = k.pattern(&PROFILE, "*").unwrap();
    assert_eq!(p.scan_match(), "cache:*profile:*");
    assert!(p.matches_value_key("cache:profile:abc"));
    assert_eq!(
        p.entry_of("cache:~s:profile:abc").unwrap().value,
        "cache:profile:abc"
    );
    // Another kind whose id happens to be "profile" is not ours.
    assert!(p.entry_of("cache:other:profile:x").is_none());
    assert!(p.entry_of("cache:profiles:x").is_none());
    let p = k.pattern(&PROFILE, "ab?").unwrap();
    assert!(p.matches_value_key("cache:profile:abc"));
    assert!(!p.matches_value_key("cache:profile:abcd"));
    let d = k.pattern(&DOCUMENT_META, "d[12]").unwrap();
    assert_eq!(d.scan_match(), "cache:*document:d[12]:metadata");
    assert!(d.matches_value_key("cache:document:d1:metadata"));
    assert!(!d.matches_value_key("cache:document:d3:metadata"));
    assert!(k.pattern(&PROFILE, "[abc").is_err());
    assert!(k.pattern(&PROFILE, "abc\\").is_err());
}

#[test]
fn pending_copies_have_a_scan_of_their_own() {
    let k = kb();
    let p = k.pattern(&PROFILE, "*").unwrap();
    assert_eq!(p.pending_scan_match(), "cache:~p:profile:*");
    let d = k.pattern(&DOCUMENT_META, "*").unwrap();
    assert_eq!(d.pending_scan_match(), "cache:~p:document:*:metadata");
    let tagged = KeyBuilder::new("cache", true).unwrap();
    let t = tagged.pattern(&PROFILE, "*").unwrap();
    assert_eq!(t.pending_scan_match(), "cache:~p:profile:\\{*\\}");
    let e = tagged.entry(&PROFILE, "u1").unwrap();
    assert_eq!(t.entry_of(&e.pending).unwrap(), e);
}

#[test]
fn parse_full_globs() {
    let k = kb();
    let kinds = [PROFILE, DOCUMENT_META];
    let p = k.parse_pattern("cache:profile:*", &kinds).unwrap();
    assert_eq!(p.kind(), PROFILE);
    let p = k
        .parse_pattern("cache:document:*:metadata", &kinds)
        .unwrap();
    assert_eq!(p.kind(), DOCUMENT_META);
    assert!(k.parse_pattern("*", &kinds).is_err());
    assert!(k.parse_pattern("other:profile:*", &kinds).is_err());
    assert!(k.parse_pattern("cache:*", &kinds).is_err());
}

#[test]
fn glob_semantics() {
    for (p, s, want) in [
        ("*", "", true),
        ("a*c", "abbbc", true),
        ("a*c", "abbbd", false),
        ("[^a]b", "cb", true),
        ("[^a]b", "ab", false),
        ("[a-c]", "b", true),
        ("\\*", "*", true),
        ("\\*", "a", false),
        ("*a*b", "xxaxxb", true),
    ] {
        assert_eq!(Glob::matches(p, s), want, "{p} vs {s}");
    }
}
