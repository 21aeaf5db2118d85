//! `unionmount image import|ls|rm|gc|verify`: managing the image store from the command line.
//! Each command prints its result on stdout, one line per item; errors are one line on
//! stderr naming what is at fault, with exit code 1 (2 for a usage error).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::image::{self, ImageSource, Platform};
use crate::store::{Digest, LayerIndex, Store};

#[derive(Parser, Debug)]
#[command(name = "unionmount image", about = "Manage the image store")]
struct ImageArgs {
    /// Image store (default: $UNIONMOUNT_STORE, /var/lib/unionmount as root,
    /// ~/.local/share/unionmount otherwise)
    #[arg(long, value_name = "DIR", global = true)]
    store: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Copy an image into the store and index its layers
    /// (docker-archive:PATH, oci:DIR[:TAG|@DIGEST], oci-archive:PATH[:TAG])
    Import {
        source: String,
        /// Name (tag) in the store; default: the source's tag, else the manifest digest
        #[arg(long)]
        name: Option<String>,
        /// Platform to pick from a multi-platform image (default: the host's)
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
    },
    /// List the images in the store: name, manifest digest, size in bytes
    Ls,
    /// Remove an image's name (its blobs go at the next gc)
    Rm { name: String },
    /// Delete blobs, indexes and file contents no image refers to
    Gc,
    /// Rehash every blob and file content; exit 1 if any is wrong
    Verify,
    /// Store an upper directory as a new layer on top of the image it was mounted over
    Commit {
        /// The image the upper was mounted over (a name in the store)
        #[arg(long, value_name = "IMAGE")]
        from: String,
        /// The upper directory of that mount (unmount first)
        #[arg(long, value_name = "DIR")]
        upper: PathBuf,
        /// Name of the new image
        #[arg(long)]
        name: String,
        /// History comment
        #[arg(long, short = 'm')]
        message: Option<String>,
    },
}

pub fn main(args: Vec<std::ffi::OsString>) -> i32 {
    let a = match ImageArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return 0;
            }
            eprintln!(
                "unionmount image: {}",
                crate::cli::clap_one_line(&e.to_string())
            );
            return 2;
        }
    };
    match run(a) {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("unionmount image: {msg}");
            1
        }
    }
}

fn open_store(dir: Option<PathBuf>) -> Result<Store, String> {
    let dir = match dir {
        Some(d) => d,
        None => Store::default_dir().map_err(|e| format!("image store: {e}"))?,
    };
    Store::open_or_create(&dir).map_err(|e| format!("image store {}: {e}", dir.display()))
}

fn run(a: ImageArgs) -> Result<(), String> {
    let store = open_store(a.store)?;
    match a.cmd {
        Cmd::Import {
            source,
            name,
            platform,
        } => {
            let platform = match platform {
                Some(p) => Some(Platform::parse(&p).map_err(|e| e.to_string())?),
                None => None,
            };
            let src = ImageSource::parse(&source).map_err(|e| e.to_string())?;
            let img = image::resolve(&src, platform.as_ref()).map_err(|e| e.to_string())?;
            let imp = crate::store::mount::import_and_index(&store, &img, name.as_deref())?;
            println!("{} {}", imp.name, imp.manifest_digest);
        }
        Cmd::Ls => {
            for e in store.list().map_err(|e| e.to_string())? {
                println!("{}\t{}\t{}", e.name, e.manifest_digest, e.size);
            }
        }
        Cmd::Rm { name } => {
            let d = store.remove(&name).map_err(|e| e.to_string())?;
            println!("untagged {name} {d}");
        }
        Cmd::Gc => {
            let live = |layer: &Digest| -> std::io::Result<Vec<Digest>> {
                let ix = match LayerIndex::read(&store.index_path(layer), layer) {
                    Ok(ix) => ix,
                    // No usable index: nothing of this layer can be in objects/ for sure,
                    // but keep its objects anyway by knowing none (they will be refetched).
                    Err(_) => return Ok(Vec::new()),
                };
                Ok(ix.entries().iter().filter_map(|e| e.sha256).collect())
            };
            let r = store.gc(Some(&live)).map_err(|e| e.to_string())?;
            println!(
                "removed {} blobs, {} indexes, {} file contents, {} temporary files; freed {} bytes",
                r.removed_blobs.len(),
                r.removed_indexes.len(),
                r.removed_objects.len(),
                r.removed_tmp,
                r.freed_bytes
            );
        }
        Cmd::Commit {
            from,
            upper,
            name,
            message,
        } => {
            let c = crate::commit::commit(&store, &from, &upper, &name, message.as_deref())?;
            println!(
                "{} {} layer {} ({} entries)",
                c.name, c.manifest, c.layer, c.entries
            );
        }
        Cmd::Verify => {
            let r = store.verify().map_err(|e| e.to_string())?;
            for b in &r.bad {
                println!(
                    "BAD {}: expected {}, content hashes to {}",
                    b.path.display(),
                    b.expected,
                    b.actual
                );
            }
            for s in &r.strays {
                println!("STRAY {}", s.display());
            }
            println!("checked {} blobs and file contents", r.checked);
            if !r.bad.is_empty() {
                return Err(format!(
                    "{} corrupt blob(s) or file content(s)",
                    r.bad.len()
                ));
            }
        }
    }
    Ok(())
}
