//! Request templates: a path, query or body with `{id}` and `{rand4}` placeholders, parsed once
//! and expanded per request into a reused buffer.

use rand::Rng;

/// One parsed piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Id,
    Rand4,
}

/// A template with `{id}` (the sampled id) and `{rand4}` (four random decimal digits)
/// placeholders. Any other text, including other braces (JSON bodies), is kept as is.
///
/// # Examples
///
/// ```
/// use kura_bench::Template;
///
/// let t = Template::parse(r#"{"phone":"080-{rand4}-{id}"}"#);
/// let out = t.expand("42", &mut rand::rng());
/// assert!(out.starts_with(r#"{"phone":"080-"#) && out.ends_with(r#"-42"}"#));
/// assert_eq!(out.len(), r#"{"phone":"080-0000-42"}"#.len());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    /// Whether `{id}` is percent-encoded (path and query) or inserted raw (body).
    encode_id: bool,
}

const ID: &str = "{id}";
const RAND4: &str = "{rand4}";

impl Template {
    /// Parses a template whose `{id}` is inserted verbatim (for bodies).
    #[must_use]
    pub fn parse(text: &str) -> Template {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(pos) = rest.find('{') {
            literal.push_str(&rest[..pos]);
            rest = &rest[pos..];
            let part = if rest.starts_with(ID) {
                rest = &rest[ID.len()..];
                Part::Id
            } else if rest.starts_with(RAND4) {
                rest = &rest[RAND4.len()..];
                Part::Rand4
            } else {
                literal.push('{');
                rest = &rest[1..];
                continue;
            };
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(part);
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Template {
            parts,
            encode_id: false,
        }
    }

    /// Parses a template for a URL path or query: `{id}` is percent-encoded, so ids with
    /// spaces or slashes still address one resource.
    #[must_use]
    pub fn parse_url(text: &str) -> Template {
        Template {
            encode_id: true,
            ..Template::parse(text)
        }
    }

    /// Whether the template uses `{id}`.
    #[must_use]
    pub fn uses_id(&self) -> bool {
        self.parts.contains(&Part::Id)
    }

    /// Whether expanding the template gives the same text every time for a given id.
    #[must_use]
    pub fn is_deterministic(&self) -> bool {
        !self.parts.contains(&Part::Rand4)
    }

    /// Expands into a new string.
    #[must_use]
    pub fn expand<R: Rng + ?Sized>(&self, id: &str, rng: &mut R) -> String {
        let mut out = String::new();
        self.expand_into(&mut out, id, rng);
        out
    }

    /// Expands into `out` (cleared first), reusing its allocation.
    pub fn expand_into<R: Rng + ?Sized>(&self, out: &mut String, id: &str, rng: &mut R) {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Id if self.encode_id => percent_encode_into(out, id),
                Part::Id => out.push_str(id),
                Part::Rand4 => {
                    let n: u16 = rng.random_range(0..10_000);
                    let digits = [n / 1000, n / 100 % 10, n / 10 % 10, n % 10];
                    for d in digits {
                        out.push(char::from(b'0' + d as u8));
                    }
                }
            }
        }
    }
}

/// Appends `s` with every byte outside RFC 3986's unreserved set percent-encoded.
fn percent_encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    #[test]
    fn expands_id_in_a_path() {
        let t = Template::parse_url("/api/v1/profiles/{id}");
        assert!(t.uses_id());
        assert!(t.is_deterministic());
        assert_eq!(t.expand("abc-1", &mut rng()), "/api/v1/profiles/abc-1");
    }

    #[test]
    fn percent_encodes_ids_in_urls_only() {
        let url = Template::parse_url("/p/{id}?x=1");
        assert_eq!(url.expand("a b/c", &mut rng()), "/p/a%20b%2Fc?x=1");
        let body = Template::parse(r#"{"id":"{id}"}"#);
        assert_eq!(body.expand("a b/c", &mut rng()), r#"{"id":"a b/c"}"#);
    }

    #[test]
    fn rand4_gives_four_digits_each_time() {
        let t = Template::parse(r#"{"phone":"080-{rand4}-{rand4}"}"#);
        assert!(!t.uses_id());
        assert!(!t.is_deterministic());
        let mut r = rng();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let out = t.expand("ignored", &mut r);
            let phone = out
                .strip_prefix(r#"{"phone":"080-"#)
                .and_then(|s| s.strip_suffix(r#""}"#))
                .expect("shape kept");
            let (a, b) = phone.split_once('-').expect("two groups");
            for group in [a, b] {
                assert_eq!(group.len(), 4, "{out}");
                assert!(group.bytes().all(|c| c.is_ascii_digit()), "{out}");
            }
            seen.insert(out);
        }
        assert!(seen.len() > 40, "values vary: {}", seen.len());
    }

    #[test]
    fn keeps_other_braces_and_unknown_placeholders() {
        let t = Template::parse("{{x}} {ids} {rand} {id");
        assert_eq!(t.expand("1", &mut rng()), "{{x}} {ids} {rand} {id");
        assert!(!t.uses_id());
        let t = Template::parse("{{id}}");
        assert_eq!(t.expand("7", &mut rng()), "{7}");
    }

    #[test]
    fn expand_into_reuses_the_buffer() {
        let t = Template::parse_url("/p/{id}");
        let mut buf = String::from("old content that is long");
        t.expand_into(&mut buf, "9", &mut rng());
        assert_eq!(buf, "/p/9");
    }

    #[test]
    fn empty_and_placeholder_only_templates() {
        assert_eq!(Template::parse("").expand("1", &mut rng()), "");
        assert_eq!(Template::parse("{id}").expand("1", &mut rng()), "1");
    }
}
