//! A tar file read as a table of members, so blobs are read in place by (offset, length)
//! instead of being extracted.
//!
//! Invariants:
//! - Member names are normalised (`./` and empty components dropped, trailing `/` removed);
//!   a name with a `..` component or an absolute name is kept out of the table (no image
//!   layout needs one), so no lookup can reach it.
//! - Every regular member's range lies inside the file; a member that runs past the end is
//!   a "truncated archive" error when the table is built.
//! - Symlinks and hard links are followed only to members of the same archive, at most
//!   [`MAX_LINK_HOPS`] times; a target that climbs above the archive root or is absolute is an
//!   error naming the link. Nothing outside the archive is ever opened.
//! - A later member with the same name replaces an earlier one (tar semantics).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tar::EntryType;

use super::blob::BlobRef;

pub const MAX_LINK_HOPS: usize = 40;

#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, len: u64 },
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    Dir,
    Other,
}

/// The members of one tar file.
#[derive(Debug)]
pub struct Archive {
    path: PathBuf,
    members: HashMap<String, Member>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Normalises a member name or link target relative to the archive root; `None` when it is
/// absolute or climbs above the root.
fn normalise(base: &[String], name: &[u8]) -> Option<Vec<String>> {
    if name.starts_with(b"/") {
        return None;
    }
    let mut out: Vec<String> = base.to_vec();
    for comp in name.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            c => out.push(String::from_utf8_lossy(c).into_owned()),
        }
    }
    Some(out)
}

impl Archive {
    /// Reads every header of the tar file at `path` (seeking over member data).
    pub fn open(path: &Path) -> io::Result<Archive> {
        let file = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let file_len = file.metadata()?.len();
        let shown = path.display();
        let mut ar = tar::Archive::new(file);
        let mut members = HashMap::new();
        let entries = ar
            .entries_with_seek()
            .map_err(|e| invalid(format!("{shown}: not a readable tar archive: {e}")))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| invalid(format!("{shown}: truncated or corrupt tar archive: {e}")))?;
            let raw_name = entry.path_bytes().into_owned();
            let Some(name) = normalise(&[], &raw_name) else {
                continue;
            };
            let name = name.join("/");
            let ty = entry.header().entry_type();
            let member = match ty {
                EntryType::Regular | EntryType::Continuous => {
                    let offset = entry.raw_file_position();
                    let len = entry.size();
                    if offset.checked_add(len).is_none_or(|end| end > file_len) {
                        return Err(invalid(format!(
                            "{shown}: truncated archive: member {name:?} needs bytes {offset}..{} \
                             but the file has {file_len}",
                            offset.saturating_add(len)
                        )));
                    }
                    Member::File { offset, len }
                }
                EntryType::Symlink | EntryType::Link => {
                    let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                    if ty == EntryType::Symlink {
                        Member::Symlink(target)
                    } else {
                        Member::Hardlink(target)
                    }
                }
                EntryType::Directory => Member::Dir,
                _ => Member::Other,
            };
            if !name.is_empty() {
                members.insert(name, member);
            }
        }
        Ok(Archive {
            path: path.to_path_buf(),
            members,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a member by that name exists (of any type, links not followed).
    pub fn contains(&self, name: &str) -> bool {
        normalise(&[], name.as_bytes()).is_some_and(|n| self.members.contains_key(&n.join("/")))
    }

    /// The bytes of the regular member `name`, following in-archive links. `Ok(None)` when
    /// no member has that name; an error for a link that leaves the archive, a loop, or a
    /// name that is not a regular file.
    pub fn find(&self, name: &str) -> io::Result<Option<BlobRef>> {
        let shown = self.path.display();
        let Some(mut comps) = normalise(&[], name.as_bytes()) else {
            return Err(invalid(format!(
                "{shown}: member name {name:?} points outside the archive"
            )));
        };
        for hop in 0..=MAX_LINK_HOPS {
            let key = comps.join("/");
            let Some(m) = self.members.get(&key) else {
                if hop == 0 {
                    return Ok(None);
                }
                return Err(invalid(format!(
                    "{shown}: {name:?} is a link to {key:?}, which is not in the archive"
                )));
            };
            match m {
                Member::File { offset, len } => {
                    return Ok(Some(BlobRef {
                        path: self.path.clone(),
                        offset: *offset,
                        len: *len,
                    }));
                }
                Member::Symlink(target) => {
                    let parent = &comps[..comps.len().saturating_sub(1)];
                    comps = normalise(parent, target).ok_or_else(|| {
                        invalid(format!(
                            "{shown}: member {key:?} is a symlink to {:?}, outside the archive",
                            String::from_utf8_lossy(target)
                        ))
                    })?;
                }
                Member::Hardlink(target) => {
                    comps = normalise(&[], target).ok_or_else(|| {
                        invalid(format!(
                            "{shown}: member {key:?} is a hard link to {:?}, outside the archive",
                            String::from_utf8_lossy(target)
                        ))
                    })?;
                }
                Member::Dir | Member::Other => {
                    return Err(invalid(format!(
                        "{shown}: member {key:?} is not a regular file"
                    )));
                }
            }
        }
        Err(invalid(format!(
            "{shown}: member {name:?}: more than {MAX_LINK_HOPS} links (a loop?)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(path: &Path, f: impl FnOnce(&mut tar::Builder<File>)) {
        let mut b = tar::Builder::new(File::create(path).unwrap());
        f(&mut b);
        b.finish().unwrap();
    }

    fn file(b: &mut tar::Builder<File>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }

    fn link(b: &mut tar::Builder<File>, ty: EntryType, name: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_size(0);
        b.append_link(&mut h, name, target).unwrap();
    }

    fn read(r: &BlobRef) -> Vec<u8> {
        let mut v = Vec::new();
        io::Read::read_to_end(&mut r.open().unwrap(), &mut v).unwrap();
        v
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("um-archive-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn members_links_and_escapes() {
        let d = tmpdir("links");
        let p = d.join("a.tar");
        build(&p, |b| {
            file(b, "./a/layer.tar", b"hello");
            link(b, EntryType::Symlink, "b/layer.tar", "../a/layer.tar");
            link(b, EntryType::Link, "c/layer.tar", "a/layer.tar");
            link(b, EntryType::Symlink, "evil/layer.tar", "../../etc/passwd");
            link(b, EntryType::Symlink, "abs", "/etc/passwd");
            link(b, EntryType::Symlink, "loop1", "loop2");
            link(b, EntryType::Symlink, "loop2", "loop1");
            link(b, EntryType::Symlink, "dangling", "nothere");
        });
        let ar = Archive::open(&p).unwrap();
        assert_eq!(read(&ar.find("a/layer.tar").unwrap().unwrap()), b"hello");
        assert_eq!(read(&ar.find("b/layer.tar").unwrap().unwrap()), b"hello");
        assert_eq!(read(&ar.find("./c/layer.tar").unwrap().unwrap()), b"hello");
        assert!(ar.find("missing").unwrap().is_none());
        let e = ar.find("evil/layer.tar").unwrap_err().to_string();
        assert!(
            e.contains(
                "\"evil/layer.tar\" is a symlink to \"../../etc/passwd\", outside the archive"
            ),
            "{e}"
        );
        assert!(
            ar.find("abs")
                .unwrap_err()
                .to_string()
                .contains("outside the archive")
        );
        assert!(ar.find("loop1").unwrap_err().to_string().contains("a loop"));
        assert!(
            ar.find("dangling")
                .unwrap_err()
                .to_string()
                .contains("not in the archive")
        );
        assert!(
            ar.find("../x")
                .unwrap_err()
                .to_string()
                .contains("outside the archive")
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn truncated_member_is_an_error() {
        let d = tmpdir("trunc");
        let p = d.join("a.tar");
        build(&p, |b| file(b, "big", &[7u8; 4000]));
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(512 + 1000).unwrap();
        let e = Archive::open(&p).unwrap_err().to_string();
        assert!(e.contains("truncated archive: member \"big\""), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
