//! Shell-style glob patterns for tool, server and callee names in caveats.
//!
//! Syntax over the whole name (anchored at both ends): `*` any run of characters (including
//! none, and including `/`), `?` one character, `[abc]` / `[a-z]` one character of a set,
//! `[!a-z]` or `[^a-z]` one character outside it (`]` first in a set is literal), `\x` the
//! character `x`. A pattern that is byte-for-byte equal to the name also matches (as the original
//! gateway did before trying the glob), so literal names with metacharacters still work.
//!
//! Matching is iterative with single-star backtracking: O(pattern × name) in the worst case,
//! never exponential. This module must never recurse on input or allocate per step.

use std::fmt;

/// Most bytes of patterns with a `*` one token may carry, all its caveats together. A holder
/// can append caveats, and a list filtered for a token matches every name against every
/// pattern: without a bound, 12 KB of `*a*a*…` would cost milliseconds a name. Real tokens
/// carry a few short globs (`read_*`).
pub const MAX_WILDCARD_BYTES: usize = 1024;

/// One parsed pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    toks: Vec<Tok>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Lit(char),
    One,
    Star,
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Tok {
    fn matches(&self, c: char) -> bool {
        match self {
            Tok::Lit(l) => *l == c,
            Tok::One => true,
            Tok::Star => false,
            Tok::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
        }
    }
}

impl Glob {
    /// Parses a pattern; the error is a short reason ("unterminated [", ...).
    pub fn new(pattern: &str) -> Result<Glob, &'static str> {
        let mut toks = Vec::new();
        let mut it = pattern.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '*' => {
                    if toks.last() != Some(&Tok::Star) {
                        toks.push(Tok::Star);
                    }
                }
                '?' => toks.push(Tok::One),
                '\\' => toks.push(Tok::Lit(it.next().ok_or("trailing backslash")?)),
                '[' => {
                    let negated = matches!(it.peek(), Some('!' | '^'));
                    if negated {
                        it.next();
                    }
                    let mut ranges = Vec::new();
                    let mut first = true;
                    loop {
                        let mut lo = it.next().ok_or("unterminated [")?;
                        if lo == ']' && !first {
                            break;
                        }
                        first = false;
                        if lo == '\\' {
                            lo = it.next().ok_or("unterminated [")?;
                        }
                        let mut hi = lo;
                        if it.peek() == Some(&'-') {
                            it.next();
                            match it.next().ok_or("unterminated [")? {
                                ']' => {
                                    // `[a-]`: the dash is literal and the set ends here.
                                    ranges.push((lo, lo));
                                    ranges.push(('-', '-'));
                                    break;
                                }
                                '\\' => hi = it.next().ok_or("unterminated [")?,
                                h => hi = h,
                            }
                            if hi < lo {
                                return Err("reversed range in [ ]");
                            }
                        }
                        ranges.push((lo, hi));
                    }
                    toks.push(Tok::Class { negated, ranges });
                }
                c => toks.push(Tok::Lit(c)),
            }
        }
        Ok(Glob {
            source: pattern.to_owned(),
            toks,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether some name that begins with `prefix`, followed by anything, could match: an
    /// over-approximation (a `*` is taken to match everything after it), for a URI template of
    /// which only the literal prefix is known.
    pub(crate) fn may_match_with_prefix(&self, prefix: &str) -> bool {
        let mut toks = self.toks.iter();
        for c in prefix.chars() {
            match toks.next() {
                None => return false,
                Some(Tok::Star) => return true,
                Some(t) if !t.matches(c) => return false,
                Some(_) => {}
            }
        }
        true
    }

    /// What matching may cost beyond one pass over the name: a pattern with a `*` backtracks,
    /// up to its length for every character of the name. Counted against
    /// [`MAX_WILDCARD_BYTES`].
    pub(crate) fn wildcard_bytes(&self) -> usize {
        if self.toks.contains(&Tok::Star) {
            self.source.len()
        } else {
            0
        }
    }

    /// Whether `name` is equal to the pattern or matches it as a glob.
    pub fn matches(&self, name: &str) -> bool {
        self.source == name || self.glob_matches(name)
    }

    fn glob_matches(&self, name: &str) -> bool {
        let p = &self.toks;
        let s = name.as_bytes();
        let (mut pi, mut si) = (0usize, 0usize);
        // Where to resume after the last `*`: (pattern index after it, name index it took up to).
        let mut resume: Option<(usize, usize)> = None;
        while si < s.len() {
            let c = char_at(name, si);
            if let Some(tok) = p.get(pi) {
                if *tok == Tok::Star {
                    resume = Some((pi + 1, si));
                    pi += 1;
                    continue;
                }
                if let Some(c) = c
                    && tok.matches(c)
                {
                    pi += 1;
                    si += c.len_utf8();
                    continue;
                }
            }
            match resume {
                Some((rp, rs)) => {
                    // Let the star swallow one more character and retry from just after it.
                    let step = char_at(name, rs).map_or(1, char::len_utf8);
                    pi = rp;
                    si = rs + step;
                    resume = Some((rp, si));
                }
                None => return false,
            }
        }
        p[pi.min(p.len())..].iter().all(|t| *t == Tok::Star)
    }
}

fn char_at(s: &str, i: usize) -> Option<char> {
    s.get(i..).and_then(|rest| rest.chars().next())
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

/// Whether any pattern matches `name`.
pub(crate) fn any_matches(globs: &[Glob], name: &str) -> bool {
    globs.iter().any(|g| g.matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Glob::new(p).map(|g| g.matches(s)).unwrap_or(false)
    }

    #[test]
    fn literals_and_wildcards() {
        assert!(m("read_invoice", "read_invoice"));
        assert!(!m("read_invoice", "read_invoices"));
        assert!(!m("read_invoice", "xread_invoice"));
        assert!(m("read_*", "read_"));
        assert!(m("read_*", "read_invoice"));
        assert!(!m("read_*", "write_invoice"));
        assert!(m("*", ""));
        assert!(m("*", "anything/with/slashes"));
        assert!(m("*delete*", "fs/delete_file"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("a*b", "abab"));
        assert!(m("?", "é"));
        assert!(!m("?", ""));
        assert!(!m("?", "ab"));
        assert!(m("??x", "éçx"));
        assert!(m("*é", "caféé"));
    }

    #[test]
    fn classes() {
        assert!(m("[abc]x", "bx"));
        assert!(!m("[abc]x", "dx"));
        assert!(m("v[0-9]", "v7"));
        assert!(!m("v[0-9]", "va"));
        assert!(m("v[!0-9]", "va"));
        assert!(m("v[^0-9]", "va"));
        assert!(!m("v[!0-9]", "v1"));
        assert!(m("[]]", "]"));
        assert!(m("[!]]", "a"));
        assert!(!m("[!]]", "]"));
        assert!(m("[a-]", "-"));
        assert!(m("[a-]", "a"));
        assert!(m("[-a]", "-"));
        assert!(m("[\\]x]", "]"));
        assert!(m("[\\!]", "!"));
    }

    #[test]
    fn escapes_and_literal_equality() {
        assert!(m("a\\*", "a*"));
        assert!(!m("a\\*", "ab"));
        assert!(m("\\[x\\]", "[x]"));
        assert!(m("a\\?b", "a?b"));
        assert!(!m("a\\?b", "acb"));
        // A pattern equal to the name matches even when its glob reading would not.
        assert!(m("[ab]", "[ab]"));
    }

    #[test]
    fn invalid_patterns() {
        assert_eq!(Glob::new("a\\"), Err("trailing backslash"));
        assert_eq!(Glob::new("[abc"), Err("unterminated ["));
        assert_eq!(Glob::new("[]"), Err("unterminated ["));
        assert_eq!(Glob::new("[!"), Err("unterminated ["));
        assert_eq!(Glob::new("[z-a]"), Err("reversed range in [ ]"));
        assert_eq!(Glob::new("[a-"), Err("unterminated ["));
    }

    #[test]
    fn no_exponential_blowup() {
        let pat = format!("{}b", "a*".repeat(64));
        let name = "a".repeat(512);
        let g = Glob::new(&pat).unwrap_or_else(|e| panic!("{e}"));
        let start = std::time::Instant::now();
        assert!(!g.matches(&name));
        assert!(start.elapsed() < std::time::Duration::from_millis(500));
        assert!(g.matches(&format!("{name}b")));
    }
}
