//! Mount options: the `-o` strings of fuse-overlayfs, containers/storage and mount(8),
//! parsed into one typed [`MountOptions`].
//!
//! Invariants: every option we know is either applied or rejected with an error that names
//! it; nothing is silently ignored except `context=` and its siblings (an SELinux label we
//! cannot apply), `subtype=`, and the mount(8)/fstab housekeeping flags listed in
//! [`parse_options`].
//!
//! Lexical rules, applied in this order:
//! 1. Each `-o` argument is a list split on `,`. A `,` inside double quotes or escaped as
//!    `\,` does not split. Unescaped double quotes are removed; an unterminated quote is an
//!    error. Empty elements (`a,,b`, a trailing comma) are skipped.
//! 2. Each element is `name` or `name=value` (split at the first `=`).
//! 3. In a value, `\X` stands for the character `X` (so `\:` is a colon, `\,` a comma, `\\`
//!    a backslash, `\"` a double quote), as kernel overlayfs unescapes its paths. A value
//!    ending in a lone `\` is an error. `lowerdir=` is split on unescaped `:` first.
//!
//! Several `-o` arguments are processed left to right: a later scalar option (and a later
//! `lowerdir=`, `uidmapping=`, `gidmapping=`) replaces an earlier one.

use std::fmt;
use std::path::PathBuf;

/// One `H:T:L` triple of `uidmapping=` / `gidmapping=`, with fuse-overlayfs semantics
/// (`fuse-overlayfs.1.md` "uidmapping=UID:MAPPED-UID:LEN"; `read_mappings` and
/// `find_mapping` in fuse-overlayfs' `main.c`):
///
/// - `H` (the first number) is an id as stored on disk, in the layers ([`IdMap::outside`]);
/// - `T` (the second number) is the id the mount reports for it ([`IdMap::inside`]);
/// - `L` (the third number) is the length of the range.
///
/// Reading (stat): an on-disk id `H + k` with `k < L` is reported as `T + k`; an on-disk id
/// covered by no triple is reported as the overflow id (65534). Writing (chown, create): an
/// id `T + k` requested through the mount is stored as `H + k`. So
/// `uidmapping=0:1000:1:1:110000:65536` — the process's `/proc/self/uid_map` written on one
/// line — makes files owned by 0 and 1 on disk show up as 0 and 1 inside that user
/// namespace. Triples are kept in the order given; ranges should not overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// First id inside the mount (what users of the mount see): `T`, the second number.
    pub inside: u32,
    /// First id on disk (in the layers): `H`, the first number.
    pub outside: u32,
    /// Number of consecutive ids mapped: `L`, the third number; never 0, and neither range
    /// goes past `u32::MAX`.
    pub len: u32,
}

/// Everything the `-o` arguments say, typed. Built by [`parse_options`]; the native
/// command-line flags (`--layers`, `--upper`, `--work`) fill the same struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Lower layers, TOP first (overlayfs order).
    pub lowers: Vec<PathBuf>,
    /// `upperdir=`: the writable layer.
    pub upper: Option<PathBuf>,
    /// `workdir=`: staging directory on the upper's filesystem.
    pub work: Option<PathBuf>,
    /// `ro` given (a later `rw` clears it).
    pub read_only: bool,
    /// `dev`/`nodev`, `suid`/`nosuid`, `exec`/`noexec`: None when not given.
    pub dev: Option<bool>,
    pub suid: Option<bool>,
    pub exec: Option<bool>,
    /// `noatime` given (mount flag).
    pub noatime: bool,
    /// `volatile` given: as in kernel overlayfs and fuse-overlayfs, no fsync reaches the
    /// upper. Kept apart from `fsync`; use [`MountOptions::wants_fsync`].
    pub volatile: bool,
    /// `fsync=0` sets false; default true.
    pub fsync: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub default_permissions: bool,
    /// `max_write=N`, N > 0.
    pub max_write: Option<u32>,
    /// `noxattrs`, `noxattrs=1` (fuse-overlayfs spelling); `noxattrs=0` clears it.
    pub noxattrs: bool,
    pub static_nlink: bool,
    pub noacl: bool,
    pub squash_to_root: bool,
    pub squash_to_uid: Option<u32>,
    pub squash_to_gid: Option<u32>,
    /// `uidmapping=` triples, in the order given; empty when not given.
    pub uid_mapping: Vec<IdMap>,
    /// `gidmapping=` triples, in the order given; empty when not given.
    pub gid_mapping: Vec<IdMap>,
    /// `xattr_permissions=0|1|2`.
    pub xattr_permissions: Option<u8>,
    /// `xino=on|off|auto`, stored as given.
    pub xino: Option<String>,
    /// `fsname=NAME`, unescaped.
    pub fsname: Option<String>,
    /// `passthrough=on|off|all`: FUSE passthrough for file data (on by default where the
    /// kernel and our privileges allow it).
    pub passthrough: bool,
    /// `passthrough=all`: read-only opens of lower files pass through on a writable mount
    /// too (a read-only fd opened before a copy-up then keeps reading the lower file).
    pub passthrough_lower: bool,
    /// `metacopy=on|off`: chmod, chown, utimes and xattr changes copy up metadata only
    /// (the data stays below until a write). None: on when a lower layer is an image layer.
    pub metacopy: Option<bool>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl MountOptions {
    /// No layers, every flag off, `fsync` on.
    pub fn new() -> Self {
        Self {
            lowers: Vec::new(),
            upper: None,
            work: None,
            read_only: false,
            dev: None,
            suid: None,
            exec: None,
            noatime: false,
            volatile: false,
            fsync: true,
            passthrough: true,
            passthrough_lower: false,
            metacopy: None,
            allow_other: false,
            allow_root: false,
            default_permissions: false,
            max_write: None,
            noxattrs: false,
            static_nlink: false,
            noacl: false,
            squash_to_root: false,
            squash_to_uid: None,
            squash_to_gid: None,
            uid_mapping: Vec::new(),
            gid_mapping: Vec::new(),
            xattr_permissions: None,
            xino: None,
            fsname: None,
        }
    }

    /// Whether fsync/fdatasync/syncfs should reach the upper layer: `fsync=1` (the
    /// default) and not `volatile`.
    pub fn wants_fsync(&self) -> bool {
        self.fsync && !self.volatile
    }

    /// Checks rules that involve more than one option. Does not check that any lower layer
    /// was given: the native `--layers` flag may supply them after `-o` is parsed.
    /// `upperdir`/`workdir` equality is only checked lexically; that they are separate
    /// subtrees of one filesystem is for the mounter to check on the real directories.
    pub fn validate_combination(&self) -> Result<(), OptionError> {
        match (&self.upper, &self.work) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(OptionError::Combination(
                    "upperdir and workdir must be given together",
                ));
            }
            (Some(upper), Some(work)) if upper == work => {
                return Err(OptionError::Combination(
                    "upperdir and workdir must be different directories",
                ));
            }
            _ => {}
        }
        if self.allow_other && self.allow_root {
            return Err(OptionError::Combination(
                "allow_other and allow_root are mutually exclusive",
            ));
        }
        Ok(())
    }
}

/// Why an option string was refused. `Display` is one line that names the option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionError {
    /// An option we do not know or do not support yet (the whole element as given).
    Unknown(String),
    /// `name` needs `=value` (or the value is empty).
    MissingValue(String),
    /// A flag that takes no value was given one: `option` is the name, `given` the element.
    UnexpectedValue { option: String, given: String },
    /// A value outside what `option` accepts.
    BadValue {
        option: String,
        expected: &'static str,
        got: String,
    },
    /// A `"` with no closing `"`; the text from the start of that element.
    UnterminatedQuote(String),
    /// An empty element in a `:`-separated layer list (`list_name` is `lowerdir` or the
    /// flag that carried the list).
    EmptyLayer { list_name: String, list: String },
    /// A value ending in a lone `\`.
    TrailingBackslash { option: String, value: String },
    /// A bad `uidmapping=`/`gidmapping=` triple; `reason` is empty when the triple is
    /// simply incomplete.
    BadIdMap {
        option: String,
        triple: String,
        reason: String,
    },
    /// Two options that cannot go together, or one that needs another.
    Combination(&'static str),
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(element) => write!(f, "unknown option '{element}'"),
            Self::MissingValue(option) => write!(f, "option '{option}' needs a value"),
            Self::UnexpectedValue { option, given } => {
                write!(f, "option '{option}' takes no value, got '{given}'")
            }
            Self::BadValue {
                option,
                expected,
                got,
            } => write!(f, "option '{option}' expects {expected}, got '{got}'"),
            Self::UnterminatedQuote(element) => {
                write!(f, "unterminated quote in option '{element}'")
            }
            Self::EmptyLayer { list_name, list } => {
                write!(f, "{list_name}: empty layer path in '{list}'")
            }
            Self::TrailingBackslash { option, value } => {
                write!(f, "option '{option}': trailing backslash in '{value}'")
            }
            Self::BadIdMap {
                option,
                triple,
                reason,
            } => {
                write!(f, "option '{option}': bad triple '{triple}'")?;
                if !reason.is_empty() {
                    write!(f, ": {reason}")?;
                }
                Ok(())
            }
            Self::Combination(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for OptionError {}

/// Parses every `-o` argument of one command line, in order, into one [`MountOptions`]
/// (starting from [`MountOptions::new`]).
///
/// Known options: `lowerdir=` (TOP first), `upperdir=`, `workdir=`, `rw`, `ro`,
/// `dev`/`nodev`, `suid`/`nosuid`, `exec`/`noexec`, `noatime`, `volatile`, `fsync=0|1`,
/// `uidmapping=`, `gidmapping=`, `squash_to_root`, `squash_to_uid=N`, `squash_to_gid=N`,
/// `xattr_permissions=0|1|2`, `static_nlink`, `noacl`, `allow_other`, `allow_root`,
/// `default_permissions`, `max_write=N` (N > 0), `noxattrs[=0|1]`, `xino=on|off|auto`,
/// `fsname=NAME`, `passthrough=on|off|all`, `metacopy=on|off`.
///
/// Accepted and ignored: `context=`, `fscontext=`, `defcontext=`, `rootcontext=` (SELinux
/// labels), `subtype=`, and the mount(8)/fstab housekeeping flags `atime`, `relatime`,
/// `strictatime`, `nodiratime`, `diratime`, `async`, `defaults`, `auto`, `noauto`, `nofail`,
/// `_netdev`, `user`, `nouser`, `users`, and any `x-*` (fstab options for userspace tools,
/// never meant for the filesystem).
///
/// Anything else is [`OptionError::Unknown`].
pub fn parse_options(opts: &[&str]) -> Result<MountOptions, OptionError> {
    let mut options = MountOptions::new();
    for arg in opts {
        for element in split_elements(arg)? {
            apply(&mut options, &element)?;
        }
    }
    Ok(options)
}

/// Splits a `lowerdir=` value into layer paths, TOP first: see [`split_layer_list`].
pub fn split_lowerdir(s: &str) -> Result<Vec<PathBuf>, OptionError> {
    split_layer_list("lowerdir", s)
}

/// Splits a layer list on unescaped `:`; `\X` is a literal `X` (`\:`, `\\`, `\,`).
/// `list_name` names the list in errors (`lowerdir`, `--layers`). An empty element (leading
/// or trailing `:`, `::`, or an empty list) is an error.
pub fn split_layer_list(list_name: &str, s: &str) -> Result<Vec<PathBuf>, OptionError> {
    let mut layers = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars();
    let empty = || OptionError::EmptyLayer {
        list_name: list_name.to_string(),
        list: s.to_string(),
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped) => current.push(escaped),
                None => {
                    return Err(OptionError::TrailingBackslash {
                        option: list_name.to_string(),
                        value: s.to_string(),
                    });
                }
            },
            ':' => {
                if current.is_empty() {
                    return Err(empty());
                }
                layers.push(PathBuf::from(std::mem::take(&mut current)));
            }
            _ => current.push(c),
        }
    }
    if current.is_empty() {
        return Err(empty());
    }
    layers.push(PathBuf::from(current));
    Ok(layers)
}

/// Splits one `-o` argument on commas outside quotes, removing the quotes and keeping
/// backslash escapes (`\X` stays two characters) for the value parsers.
fn split_elements(arg: &str) -> Result<Vec<String>, OptionError> {
    let mut elements = Vec::new();
    let mut current = String::new();
    // Byte offset in `arg` where `current` starts, to quote the raw text in errors.
    let mut start = 0;
    let mut in_quotes = false;
    let mut chars = arg.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                current.push('\\');
                if let Some((_, escaped)) = chars.next() {
                    current.push(escaped);
                }
            }
            '"' => in_quotes = !in_quotes,
            ',' if !in_quotes => {
                if !current.is_empty() {
                    elements.push(std::mem::take(&mut current));
                }
                start = i + 1;
            }
            _ => current.push(c),
        }
    }
    if in_quotes {
        return Err(OptionError::UnterminatedQuote(arg[start..].to_string()));
    }
    if !current.is_empty() {
        elements.push(current);
    }
    Ok(elements)
}

/// `\X` → `X`; a lone trailing `\` is an error naming `option`.
fn unescape(option: &str, value: &str) -> Result<String, OptionError> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(escaped) => out.push(escaped),
                None => {
                    return Err(OptionError::TrailingBackslash {
                        option: option.to_string(),
                        value: value.to_string(),
                    });
                }
            }
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

/// Applies one element (`name` or `name=value`, quotes already removed) to `o`.
fn apply(o: &mut MountOptions, element: &str) -> Result<(), OptionError> {
    let (name, value) = match element.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (element, None),
    };
    match name {
        "lowerdir" => o.lowers = split_lowerdir(required(name, value)?)?,
        "upperdir" => o.upper = Some(PathBuf::from(unescape(name, required(name, value)?)?)),
        "workdir" => o.work = Some(PathBuf::from(unescape(name, required(name, value)?)?)),
        "fsname" => o.fsname = Some(unescape(name, required(name, value)?)?),
        "fsync" => o.fsync = zero_or_one(name, required(name, value)?)?,
        "noxattrs" => {
            o.noxattrs = match value {
                None => true,
                Some(v) => zero_or_one(name, v)?,
            }
        }
        "uidmapping" => o.uid_mapping = parse_id_maps(name, required(name, value)?)?,
        "gidmapping" => o.gid_mapping = parse_id_maps(name, required(name, value)?)?,
        "squash_to_uid" => o.squash_to_uid = Some(id_value(name, required(name, value)?)?),
        "squash_to_gid" => o.squash_to_gid = Some(id_value(name, required(name, value)?)?),
        "max_write" => {
            let v = required(name, value)?;
            match parse_u32(v) {
                Some(n) if n > 0 => o.max_write = Some(n),
                _ => return Err(bad_value(name, "a number from 1 to 4294967295", v)),
            }
        }
        "xattr_permissions" => {
            let v = required(name, value)?;
            o.xattr_permissions = Some(match v {
                "0" => 0,
                "1" => 1,
                "2" => 2,
                _ => return Err(bad_value(name, "0, 1 or 2", v)),
            });
        }
        "passthrough" => {
            let v = required(name, value)?;
            (o.passthrough, o.passthrough_lower) = match v {
                "on" | "1" => (true, false),
                "all" => (true, true),
                "off" | "0" => (false, false),
                _ => return Err(bad_value(name, "on, off or all", v)),
            }
        }
        "metacopy" => {
            let v = required(name, value)?;
            o.metacopy = Some(match v {
                "on" => true,
                "off" => false,
                _ => return Err(bad_value(name, "on or off", v)),
            });
        }
        "xino" => {
            let v = required(name, value)?;
            match v {
                "on" | "off" | "auto" => o.xino = Some(v.to_string()),
                _ => return Err(bad_value(name, "on, off or auto", v)),
            }
        }
        "context" | "fscontext" | "defcontext" | "rootcontext" | "subtype" => {
            required(name, value)?;
        }
        _ => {
            // Everything below is a flag: it takes no value.
            let field: Option<&mut bool> = match name {
                "volatile" => Some(&mut o.volatile),
                "noatime" => Some(&mut o.noatime),
                "squash_to_root" => Some(&mut o.squash_to_root),
                "static_nlink" => Some(&mut o.static_nlink),
                "noacl" => Some(&mut o.noacl),
                "allow_other" => Some(&mut o.allow_other),
                "allow_root" => Some(&mut o.allow_root),
                "default_permissions" => Some(&mut o.default_permissions),
                _ => None,
            };
            if let Some(field) = field {
                flag(name, value, element)?;
                *field = true;
                return Ok(());
            }
            let tristate: Option<(&mut Option<bool>, bool)> = match name {
                "dev" => Some((&mut o.dev, true)),
                "nodev" => Some((&mut o.dev, false)),
                "suid" => Some((&mut o.suid, true)),
                "nosuid" => Some((&mut o.suid, false)),
                "exec" => Some((&mut o.exec, true)),
                "noexec" => Some((&mut o.exec, false)),
                _ => None,
            };
            if let Some((field, on)) = tristate {
                flag(name, value, element)?;
                *field = Some(on);
                return Ok(());
            }
            match name {
                "rw" | "ro" => {
                    flag(name, value, element)?;
                    o.read_only = name == "ro";
                }
                "atime" | "relatime" | "strictatime" | "nodiratime" | "diratime" | "async"
                | "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "nouser"
                | "users" => flag(name, value, element)?,
                _ if name.starts_with("x-") => {}
                _ => return Err(OptionError::Unknown(element.to_string())),
            }
        }
    }
    Ok(())
}

/// The value of `name`, which must be present and non-empty.
fn required<'a>(name: &str, value: Option<&'a str>) -> Result<&'a str, OptionError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(OptionError::MissingValue(name.to_string())),
    }
}

/// A flag must come without `=value`.
fn flag(name: &str, value: Option<&str>, element: &str) -> Result<(), OptionError> {
    match value {
        None => Ok(()),
        Some(_) => Err(OptionError::UnexpectedValue {
            option: name.to_string(),
            given: element.to_string(),
        }),
    }
}

fn bad_value(name: &str, expected: &'static str, got: &str) -> OptionError {
    OptionError::BadValue {
        option: name.to_string(),
        expected,
        got: got.to_string(),
    }
}

fn zero_or_one(name: &str, v: &str) -> Result<bool, OptionError> {
    match v {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(bad_value(name, "0 or 1", v)),
    }
}

fn id_value(name: &str, v: &str) -> Result<u32, OptionError> {
    parse_u32(v).ok_or_else(|| bad_value(name, "a number from 0 to 4294967295", v))
}

/// Decimal digits only (no sign, no spaces), fitting in u32.
fn parse_u32(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `H:T:L[:H:T:L...]` → one [`IdMap`] per triple, in order.
fn parse_id_maps(name: &str, value: &str) -> Result<Vec<IdMap>, OptionError> {
    let fields: Vec<&str> = value.split(':').collect();
    let mut maps = Vec::with_capacity(fields.len() / 3);
    for chunk in fields.chunks(3) {
        let triple = chunk.join(":");
        let bad = |reason: String| OptionError::BadIdMap {
            option: name.to_string(),
            triple: triple.clone(),
            reason,
        };
        if chunk.len() != 3 {
            return Err(bad(String::new()));
        }
        let mut numbers = [0u32; 3];
        for (slot, field) in numbers.iter_mut().zip(chunk) {
            *slot = parse_u32(field)
                .ok_or_else(|| bad(format!("'{field}' is not a number from 0 to 4294967295")))?;
        }
        let [outside, inside, len] = numbers;
        if len == 0 {
            return Err(bad("length is 0".to_string()));
        }
        if outside.checked_add(len - 1).is_none() || inside.checked_add(len - 1).is_none() {
            return Err(bad("range goes past 4294967295".to_string()));
        }
        maps.push(IdMap {
            inside,
            outside,
            len,
        });
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn parse(args: &[&str]) -> MountOptions {
        parse_options(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn err(args: &[&str]) -> String {
        match parse_options(args) {
            Ok(o) => panic!("{args:?} parsed: {o:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults() {
        let o = parse(&[]);
        assert_eq!(o, MountOptions::default());
        assert_eq!(o, MountOptions::new());
        assert!(o.fsync);
        assert!(o.wants_fsync());
        assert!(!o.read_only);
        assert_eq!(o.dev, None);
        assert_eq!(o.suid, None);
        assert_eq!(o.exec, None);
        assert!(o.lowers.is_empty());
        assert_eq!(parse(&["", ",", ",,"]), MountOptions::new());
    }

    #[test]
    fn containers_storage_shape() {
        let o = parse(&[
            "lowerdir=/var/lib/containers/storage/overlay/l/AAA:/var/lib/containers/storage/overlay/l/BBB,upperdir=/x/diff,workdir=/x/work,context=\"system_u:object_r:container_file_t:s0:c1022,c1023\",volatile",
        ]);
        let mut want = MountOptions::new();
        want.lowers = vec![
            p("/var/lib/containers/storage/overlay/l/AAA"),
            p("/var/lib/containers/storage/overlay/l/BBB"),
        ];
        want.upper = Some(p("/x/diff"));
        want.work = Some(p("/x/work"));
        want.volatile = true;
        assert_eq!(o, want);
        assert!(o.fsync);
        assert!(!o.wants_fsync());
        assert_eq!(o.validate_combination(), Ok(()));
    }

    #[test]
    fn mount8_shape() {
        let o = parse(&["rw,lowerdir=/a:/b,upperdir=/u,workdir=/w,dev,suid"]);
        let mut want = MountOptions::new();
        want.lowers = vec![p("/a"), p("/b")];
        want.upper = Some(p("/u"));
        want.work = Some(p("/w"));
        want.read_only = false;
        want.dev = Some(true);
        want.suid = Some(true);
        assert_eq!(o, want);
    }

    #[test]
    fn lowerdir_is_top_first_and_replaced() {
        let o = parse(&["lowerdir=/top:/mid:/base"]);
        assert_eq!(o.lowers, vec![p("/top"), p("/mid"), p("/base")]);
        let o = parse(&["lowerdir=/a:/b,lowerdir=/c"]);
        assert_eq!(o.lowers, vec![p("/c")]);
        let o = parse(&["lowerdir=/a:/b", "lowerdir=/d:/e"]);
        assert_eq!(o.lowers, vec![p("/d"), p("/e")]);
        let o = parse(&["lowerdir=relative/dir"]);
        assert_eq!(o.lowers, vec![p("relative/dir")]);
    }

    #[test]
    fn split_lowerdir_escapes() {
        assert_eq!(split_lowerdir("/a").unwrap(), vec![p("/a")]);
        assert_eq!(
            split_lowerdir(r"/a\:b:/c").unwrap(),
            vec![p("/a:b"), p("/c")]
        );
        assert_eq!(
            split_lowerdir(r"/back\\slash:/com\,ma").unwrap(),
            vec![p(r"/back\slash"), p("/com,ma")]
        );
        // `\\:` is an escaped backslash followed by a separator.
        assert_eq!(
            split_lowerdir(r"/a\\:/b").unwrap(),
            vec![p(r"/a\"), p("/b")]
        );
        assert_eq!(split_lowerdir(r"\:").unwrap(), vec![p(":")]);
        assert_eq!(
            split_lowerdir(r"/a\").unwrap_err().to_string(),
            r"option 'lowerdir': trailing backslash in '/a\'"
        );
    }

    #[test]
    fn split_lowerdir_empty_elements() {
        for bad in ["a::b", ":a", "a:", "", ":", "::"] {
            let e = split_lowerdir(bad).unwrap_err();
            assert_eq!(
                e,
                OptionError::EmptyLayer {
                    list_name: "lowerdir".into(),
                    list: bad.into()
                }
            );
            assert_eq!(
                e.to_string(),
                format!("lowerdir: empty layer path in '{bad}'")
            );
        }
        assert_eq!(
            split_layer_list("--layers", "A::B")
                .unwrap_err()
                .to_string(),
            "--layers: empty layer path in 'A::B'"
        );
        assert_eq!(
            split_layer_list("--layers", "A:B:C").unwrap(),
            vec![p("A"), p("B"), p("C")]
        );
        assert_eq!(
            err(&["lowerdir=/a::/b,upperdir=/u"]),
            "lowerdir: empty layer path in '/a::/b'"
        );
    }

    #[test]
    fn escapes_in_option_strings() {
        let o = parse(&[r"lowerdir=/l\:1:/l\,2,upperdir=/u\:x,workdir=/w\,y\\z"]);
        assert_eq!(o.lowers, vec![p("/l:1"), p("/l,2")]);
        assert_eq!(o.upper, Some(p("/u:x")));
        assert_eq!(o.work, Some(p(r"/w,y\z")));
        // An escaped quote is a literal quote and does not open a quoted section.
        let o = parse(&[r#"upperdir=/a\"b,workdir=/w"#]);
        assert_eq!(o.upper, Some(p("/a\"b")));
        assert_eq!(o.work, Some(p("/w")));
        assert_eq!(
            err(&[r"upperdir=/u\"]),
            r"option 'upperdir': trailing backslash in '/u\'"
        );
    }

    #[test]
    fn quotes_group_commas_and_are_removed() {
        let o = parse(&[r#"lowerdir="/a,b:/c",upperdir="/u",workdir=/w"#]);
        assert_eq!(o.lowers, vec![p("/a,b"), p("/c")]);
        assert_eq!(o.upper, Some(p("/u")));
        assert_eq!(o.work, Some(p("/w")));
        let o = parse(&[r#"fsname="my,fs""#]);
        assert_eq!(o.fsname.as_deref(), Some("my,fs"));
        // All four SELinux options, quoted with commas, are accepted and change nothing.
        let o = parse(&[
            r#"context="system_u:object_r:container_file_t:s0:c1,c2",fscontext="a,b",defcontext="c,d",rootcontext="e,f""#,
        ]);
        assert_eq!(o, MountOptions::new());
        let o = parse(&["context=system_u:object_r:container_file_t:s0"]);
        assert_eq!(o, MountOptions::new());
    }

    #[test]
    fn unterminated_quote() {
        let e = parse_options(&[r#"lowerdir=/a,context="system_u:s0:c1,c2"#]).unwrap_err();
        assert_eq!(
            e,
            OptionError::UnterminatedQuote(r#"context="system_u:s0:c1,c2"#.into())
        );
        assert_eq!(
            e.to_string(),
            r#"unterminated quote in option 'context="system_u:s0:c1,c2'"#
        );
        assert_eq!(
            err(&[r#"upperdir="/u"#]),
            r#"unterminated quote in option 'upperdir="/u'"#
        );
        // Three quotes: the third one is left open.
        assert_eq!(
            err(&[r#"rw,fsname="a"b"c,ro"#]),
            r#"unterminated quote in option 'fsname="a"b"c,ro'"#
        );
    }

    #[test]
    fn empty_elements_are_skipped() {
        let o = parse(&[",rw,,ro,", ",,noatime,"]);
        assert!(o.read_only);
        assert!(o.noatime);
    }

    #[test]
    fn unknown_options_are_named() {
        assert_eq!(err(&["foo=bar"]), "unknown option 'foo=bar'");
        assert_eq!(err(&["rw,frobnicate,ro"]), "unknown option 'frobnicate'");
        assert_eq!(
            err(&["redirect_dir=on"]),
            "unknown option 'redirect_dir=on'"
        );
        assert_eq!(err(&["threaded=1"]), "unknown option 'threaded=1'");
        assert_eq!(err(&["Lowerdir=/a"]), "unknown option 'Lowerdir=/a'");
        assert_eq!(err(&["sync"]), "unknown option 'sync'");
        // The fuse-overlayfs man page shows comma-joined triples; the second one is then a
        // separate element, which is refused rather than silently dropped.
        assert_eq!(
            err(&["uidmapping=0:1000:1,1:100000:65536"]),
            "unknown option '1:100000:65536'"
        );
        assert_eq!(
            parse_options(&["ro", "bogus"]).unwrap_err(),
            OptionError::Unknown("bogus".into())
        );
    }

    #[test]
    fn ro_rw_last_wins() {
        assert!(parse(&["ro"]).read_only);
        assert!(!parse(&["rw"]).read_only);
        assert!(!parse(&["ro,rw"]).read_only);
        assert!(parse(&["rw,ro"]).read_only);
        assert!(parse(&["rw", "ro"]).read_only);
        assert!(!parse(&["ro", "rw"]).read_only);
        assert_eq!(err(&["ro=1"]), "option 'ro' takes no value, got 'ro=1'");
    }

    #[test]
    fn dev_suid_exec() {
        let o = parse(&["dev,suid,exec"]);
        assert_eq!(
            (o.dev, o.suid, o.exec),
            (Some(true), Some(true), Some(true))
        );
        let o = parse(&["nodev,nosuid,noexec"]);
        assert_eq!(
            (o.dev, o.suid, o.exec),
            (Some(false), Some(false), Some(false))
        );
        let o = parse(&["nodev,nosuid", "dev"]);
        assert_eq!((o.dev, o.suid, o.exec), (Some(true), Some(false), None));
        assert_eq!(
            err(&["nosuid=0"]),
            "option 'nosuid' takes no value, got 'nosuid=0'"
        );
    }

    #[test]
    fn housekeeping_flags_are_accepted_without_effect() {
        let all = "atime,relatime,strictatime,nodiratime,diratime,async,defaults,auto,noauto,\
                   nofail,_netdev,user,nouser,users,x-systemd.automount,x-gvfs-show";
        assert_eq!(parse(&[all]), MountOptions::new());
        assert_eq!(
            err(&["defaults=1"]),
            "option 'defaults' takes no value, got 'defaults=1'"
        );
        assert_eq!(parse(&["subtype=unionmount"]), MountOptions::new());
        assert_eq!(err(&["subtype"]), "option 'subtype' needs a value");
    }

    #[test]
    fn boolean_flags() {
        let o = parse(&[
            "noatime,volatile,squash_to_root,static_nlink,noacl,allow_other,default_permissions",
        ]);
        let mut want = MountOptions::new();
        want.noatime = true;
        want.volatile = true;
        want.squash_to_root = true;
        want.static_nlink = true;
        want.noacl = true;
        want.allow_other = true;
        want.default_permissions = true;
        assert_eq!(o, want);
        let o = parse(&["allow_root"]);
        assert!(o.allow_root);
        assert!(!o.allow_other);
        assert_eq!(
            err(&["volatile=1"]),
            "option 'volatile' takes no value, got 'volatile=1'"
        );
        assert_eq!(
            err(&["allow_other=yes"]),
            "option 'allow_other' takes no value, got 'allow_other=yes'"
        );
    }

    #[test]
    fn fsync() {
        assert!(parse(&["fsync=1"]).fsync);
        assert!(!parse(&["fsync=0"]).fsync);
        assert!(!parse(&["fsync=0"]).wants_fsync());
        assert!(parse(&["fsync=0", "fsync=1"]).fsync);
        assert_eq!(err(&["fsync=x"]), "option 'fsync' expects 0 or 1, got 'x'");
        assert_eq!(err(&["fsync=2"]), "option 'fsync' expects 0 or 1, got '2'");
        assert_eq!(err(&["fsync"]), "option 'fsync' needs a value");
        assert_eq!(err(&["fsync="]), "option 'fsync' needs a value");
    }

    #[test]
    fn noxattrs() {
        assert!(parse(&["noxattrs"]).noxattrs);
        assert!(parse(&["noxattrs=1"]).noxattrs);
        assert!(!parse(&["noxattrs=0"]).noxattrs);
        assert!(!parse(&["noxattrs", "noxattrs=0"]).noxattrs);
        assert_eq!(
            err(&["noxattrs=yes"]),
            "option 'noxattrs' expects 0 or 1, got 'yes'"
        );
    }

    #[test]
    fn squash_to_ids() {
        let o = parse(&["squash_to_uid=1000,squash_to_gid=0"]);
        assert_eq!(o.squash_to_uid, Some(1000));
        assert_eq!(o.squash_to_gid, Some(0));
        assert_eq!(
            parse(&["squash_to_uid=4294967295"]).squash_to_uid,
            Some(u32::MAX)
        );
        assert_eq!(
            parse(&["squash_to_uid=1", "squash_to_uid=2"]).squash_to_uid,
            Some(2)
        );
        for bad in ["-1", "abc", "4294967296", "+5", " 5", "1.0"] {
            assert_eq!(
                err(&[&format!("squash_to_uid={bad}")]),
                format!(
                    "option 'squash_to_uid' expects a number from 0 to 4294967295, got '{bad}'"
                )
            );
        }
        assert_eq!(
            err(&["squash_to_gid"]),
            "option 'squash_to_gid' needs a value"
        );
    }

    #[test]
    fn xattr_permissions() {
        assert_eq!(parse(&["xattr_permissions=0"]).xattr_permissions, Some(0));
        assert_eq!(parse(&["xattr_permissions=1"]).xattr_permissions, Some(1));
        assert_eq!(parse(&["xattr_permissions=2"]).xattr_permissions, Some(2));
        assert_eq!(
            err(&["xattr_permissions=3"]),
            "option 'xattr_permissions' expects 0, 1 or 2, got '3'"
        );
    }

    #[test]
    fn max_write() {
        assert_eq!(parse(&["max_write=131072"]).max_write, Some(131072));
        assert_eq!(
            err(&["max_write=0"]),
            "option 'max_write' expects a number from 1 to 4294967295, got '0'"
        );
        assert_eq!(
            err(&["max_write=1M"]),
            "option 'max_write' expects a number from 1 to 4294967295, got '1M'"
        );
    }

    #[test]
    fn xino() {
        for v in ["on", "off", "auto"] {
            assert_eq!(parse(&[&format!("xino={v}")]).xino.as_deref(), Some(v));
        }
        assert_eq!(
            err(&["xino=yes"]),
            "option 'xino' expects on, off or auto, got 'yes'"
        );
        assert_eq!(err(&["xino"]), "option 'xino' needs a value");
        assert!(parse(&[]).passthrough);
        assert!(!parse(&["passthrough=off"]).passthrough);
        assert!(parse(&["passthrough=off,passthrough=on"]).passthrough);
        assert!(!parse(&["passthrough=on"]).passthrough_lower);
        let all = parse(&["passthrough=all"]);
        assert!(all.passthrough && all.passthrough_lower);
        assert!(!parse(&["passthrough=all,passthrough=off"]).passthrough_lower);
        assert_eq!(
            err(&["passthrough=maybe"]),
            "option 'passthrough' expects on, off or all, got 'maybe'"
        );
        assert_eq!(parse(&[]).metacopy, None);
        assert_eq!(parse(&["metacopy=on"]).metacopy, Some(true));
        assert_eq!(parse(&["metacopy=on,metacopy=off"]).metacopy, Some(false));
        assert_eq!(
            err(&["metacopy=yes"]),
            "option 'metacopy' expects on or off, got 'yes'"
        );
    }

    #[test]
    fn fsname() {
        assert_eq!(
            parse(&["fsname=unionmount"]).fsname.as_deref(),
            Some("unionmount")
        );
        assert_eq!(parse(&[r"fsname=a\:b"]).fsname.as_deref(), Some("a:b"));
        assert_eq!(err(&["fsname="]), "option 'fsname' needs a value");
    }

    #[test]
    fn missing_path_values() {
        assert_eq!(err(&["upperdir="]), "option 'upperdir' needs a value");
        assert_eq!(err(&["workdir"]), "option 'workdir' needs a value");
        assert_eq!(err(&["lowerdir"]), "option 'lowerdir' needs a value");
        assert_eq!(err(&["lowerdir="]), "option 'lowerdir' needs a value");
        assert_eq!(err(&["context"]), "option 'context' needs a value");
    }

    #[test]
    fn id_mappings() {
        let o = parse(&["uidmapping=0:1000:1:1:110000:65536,gidmapping=0:1000:1"]);
        assert_eq!(
            o.uid_mapping,
            vec![
                IdMap {
                    outside: 0,
                    inside: 1000,
                    len: 1
                },
                IdMap {
                    outside: 1,
                    inside: 110000,
                    len: 65536
                },
            ]
        );
        assert_eq!(
            o.gid_mapping,
            vec![IdMap {
                outside: 0,
                inside: 1000,
                len: 1
            }]
        );
        // A later mapping replaces the earlier one.
        let o = parse(&["uidmapping=0:1:1", "uidmapping=5:6:7"]);
        assert_eq!(
            o.uid_mapping,
            vec![IdMap {
                outside: 5,
                inside: 6,
                len: 7
            }]
        );
        // Largest ranges that still fit.
        let o = parse(&["uidmapping=0:0:4294967295,gidmapping=4294967295:1:1"]);
        assert_eq!(o.uid_mapping[0].len, u32::MAX);
        assert_eq!(o.gid_mapping[0].outside, u32::MAX);
    }

    #[test]
    fn bad_id_mappings() {
        assert_eq!(
            err(&["uidmapping=0:1000"]),
            "option 'uidmapping': bad triple '0:1000'"
        );
        assert_eq!(
            err(&["gidmapping=0:1000:1:5"]),
            "option 'gidmapping': bad triple '5'"
        );
        assert_eq!(
            err(&["uidmapping=0:1000:0"]),
            "option 'uidmapping': bad triple '0:1000:0': length is 0"
        );
        assert_eq!(
            err(&["uidmapping=4294967295:0:2"]),
            "option 'uidmapping': bad triple '4294967295:0:2': range goes past 4294967295"
        );
        assert_eq!(
            err(&["uidmapping=0:4294967000:1000"]),
            "option 'uidmapping': bad triple '0:4294967000:1000': range goes past 4294967295"
        );
        assert_eq!(
            err(&["uidmapping=0:x:1"]),
            "option 'uidmapping': bad triple '0:x:1': 'x' is not a number from 0 to 4294967295"
        );
        assert_eq!(
            err(&["uidmapping=0::1"]),
            "option 'uidmapping': bad triple '0::1': '' is not a number from 0 to 4294967295"
        );
        assert_eq!(
            err(&["uidmapping=0:4294967296:1"]),
            "option 'uidmapping': bad triple '0:4294967296:1': '4294967296' is not a number from 0 to 4294967295"
        );
        assert_eq!(err(&["uidmapping="]), "option 'uidmapping' needs a value");
        assert_eq!(
            err(&["gidmapping=0:1:1:"]),
            "option 'gidmapping': bad triple ''"
        );
    }

    #[test]
    fn several_arguments_merge() {
        let o = parse(&[
            "lowerdir=/l1:/l2,upperdir=/u1",
            "workdir=/w,upperdir=/u2,fsync=0",
            "ro,squash_to_uid=7",
            "rw,nodev",
        ]);
        let mut want = MountOptions::new();
        want.lowers = vec![p("/l1"), p("/l2")];
        want.upper = Some(p("/u2"));
        want.work = Some(p("/w"));
        want.fsync = false;
        want.squash_to_uid = Some(7);
        want.read_only = false;
        want.dev = Some(false);
        assert_eq!(o, want);
    }

    #[test]
    fn errors_stop_at_the_first_bad_argument() {
        assert_eq!(
            err(&["lowerdir=/a", "fsync=maybe", "bogus"]),
            "option 'fsync' expects 0 or 1, got 'maybe'"
        );
    }

    #[test]
    fn validate_combination() {
        let ok = parse(&["lowerdir=/a,upperdir=/u,workdir=/w"]);
        assert_eq!(ok.validate_combination(), Ok(()));
        // No lowers is the caller's business (`--layers` may supply them).
        assert_eq!(
            parse(&["upperdir=/u,workdir=/w"]).validate_combination(),
            Ok(())
        );
        assert_eq!(parse(&["lowerdir=/a"]).validate_combination(), Ok(()));
        assert_eq!(parse(&[]).validate_combination(), Ok(()));

        let e = parse(&["lowerdir=/a,upperdir=/u"])
            .validate_combination()
            .unwrap_err();
        assert_eq!(e.to_string(), "upperdir and workdir must be given together");
        let e = parse(&["lowerdir=/a,workdir=/w"])
            .validate_combination()
            .unwrap_err();
        assert_eq!(e.to_string(), "upperdir and workdir must be given together");
        let e = parse(&["upperdir=/x,workdir=/x"])
            .validate_combination()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "upperdir and workdir must be different directories"
        );
        let e = parse(&["allow_other,allow_root"])
            .validate_combination()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "allow_other and allow_root are mutually exclusive"
        );
    }

    #[test]
    fn error_is_std_error_and_one_line() {
        let e: Box<dyn std::error::Error> = Box::new(OptionError::Unknown("x".into()));
        assert_eq!(e.to_string(), "unknown option 'x'");
        for args in [
            &["foo"][..],
            &["fsync=2"],
            &["context=\"a"],
            &["lowerdir=a::b"],
            &["uidmapping=1"],
            &["ro=1"],
            &["upperdir="],
        ] {
            let msg = err(args);
            assert!(!msg.contains('\n'), "{msg:?}");
        }
    }
}
