//! The inode table: FUSE node ids, the names they are reachable by, lookup counts, and
//! the `st_ino` numbers we report.
//!
//! Identity: fuser sends an entry's node id as the inode's `st_ino`, so a node id IS the
//! `st_ino` we report. Numbers come from `InoTable`: the first (dev, ino) an object is seen
//! with gets a fresh number; copy-up and link map the upper (dev, ino) to the same number,
//! so `st_ino` survives copy-up, is unique across layers on different filesystems, and
//! readdir computes `d_ino` from an entry's (dev, d_ino) without a lookup. Hard links of one
//! layer therefore share a node; once any of its names is in the upper, the node is upper
//! for all of them (overlayfs `index=on` behaviour, see copy-up).
//!
//! Lock order: `NodeTable::index`, then a node's `state`; never the reverse, and never
//! across I/O. `Node::copy_lock` is held across copy-up I/O and taken parent-before-child.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;

use crate::layer::{LayerIdx, RealId};

pub type NodeId = u64;
pub const ROOT_ID: NodeId = 1;

#[derive(Debug)]
pub struct NodeState {
    /// (parent, name) pairs this node is reachable by; the first one is used to reach it in
    /// the layers. Empty when the node was unlinked (it lives on through open handles).
    pub aliases: Vec<(NodeId, OsString)>,
    /// Layers holding the object, top first. A non-directory has one, or two for a
    /// metadata-only copy (metacopy): the upper (metadata) and the lower holding its bytes.
    /// A directory lists every layer it merges, ending at the first opaque one.
    pub layers: Vec<LayerIdx>,
}

#[derive(Debug)]
pub struct Node {
    pub id: NodeId,
    pub ino: u64,
    /// S_IFMT bits; a node never changes type.
    pub kind: u32,
    pub nlookup: AtomicU64,
    pub state: RwLock<NodeState>,
    pub copy_lock: Mutex<()>,
    /// Namespace generation of a directory: bumped by every change of what its names
    /// resolve to (create, remove, rename, link, copy-up of a child).
    generation: AtomicU64,
    /// A directory whose subdirectories were handed to the prefetcher (once per node).
    pub prefetched: std::sync::atomic::AtomicBool,
    /// The file handle of the node's upper object, once seen (`sys::name_to_handle`): how a
    /// request reaches the object while a racing rename or unlink has moved its name and
    /// the table has not caught up (see `Union::is_node_object`).
    pub handle: std::sync::OnceLock<Vec<u8>>,
    /// Copied up by this mount and not fully fsynced since: the rename that gave it its
    /// upper name may not be on disk, and fdatasync alone would not commit it.
    pub name_unsynced: std::sync::atomic::AtomicBool,
    /// Its names moved to a new node (`NodeTable::supersede`): it lives on only for the
    /// handles open on it, and an open by name answers ESTALE so that the kernel looks again.
    pub superseded: std::sync::atomic::AtomicBool,
}

impl Node {
    /// A fresh node numbered `ino` (its node id too), with no kernel lookup counted.
    fn new(ino: u64, kind: u32, aliases: Vec<(NodeId, OsString)>, layers: Vec<LayerIdx>) -> Node {
        Node {
            id: ino,
            ino,
            kind,
            nlookup: AtomicU64::new(0),
            state: RwLock::new(NodeState { aliases, layers }),
            copy_lock: Mutex::new(()),
            generation: AtomicU64::new(0),
            prefetched: std::sync::atomic::AtomicBool::new(false),
            handle: std::sync::OnceLock::new(),
            name_unsynced: std::sync::atomic::AtomicBool::new(false),
            superseded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, NodeState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, NodeState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Records a change of the names in this directory.
    pub fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn top_layer(&self) -> LayerIdx {
        self.read().layers.first().copied().unwrap_or(usize::MAX)
    }

    pub fn layers(&self) -> Vec<LayerIdx> {
        self.read().layers.clone()
    }

    /// The layer holding a file's bytes: its only one, or the lower one of a metacopy.
    pub fn data_layer(&self) -> LayerIdx {
        self.read().layers.last().copied().unwrap_or(usize::MAX)
    }

    /// A file copied up without its bytes (they are still in `data_layer`).
    pub fn is_metacopy(&self) -> bool {
        !self.is_dir() && self.read().layers.len() > 1
    }
}

#[derive(Default)]
struct Index {
    by_name: HashMap<(NodeId, OsString), NodeId>,
}

/// Stable `st_ino` numbers keyed by (dev, ino) of the object in its layer.
#[derive(Default)]
pub struct InoTable {
    map: DashMap<RealId, u64>,
    next: AtomicU64,
}

impl InoTable {
    pub fn new(root: RealId) -> InoTable {
        let t = InoTable {
            map: DashMap::new(),
            next: AtomicU64::new(2),
        };
        t.map.insert(root, 1);
        t
    }

    pub fn get(&self, id: RealId) -> u64 {
        if let Some(v) = self.map.get(&id) {
            return *v;
        }
        *self
            .map
            .entry(id)
            .or_insert_with(|| self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// The number `id` reports, if it has one (never allocates).
    pub fn peek(&self, id: RealId) -> Option<u64> {
        self.map.get(&id).map(|v| *v)
    }

    /// Gives `id` a new number: its old one belongs to a node of a deleted object whose
    /// inode the filesystem has reused.
    pub fn renew(&self, id: RealId) -> u64 {
        let ino = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.insert(id, ino);
        ino
    }

    /// Makes `id` report `ino` (after copy-up, a link, or a rename into place).
    pub fn set(&self, id: RealId, ino: u64) {
        self.map.insert(id, ino);
    }

    pub fn forget(&self, id: RealId) {
        self.map.remove(&id);
    }

    /// Makes every object that reports `from` report `to` (a scan: for rare events only).
    fn remap(&self, from: u64, to: u64) {
        for mut e in self.map.iter_mut() {
            if *e == from {
                *e = to;
            }
        }
    }
}

/// What a lookup found, enough to make or refresh a node.
pub struct Found {
    pub kind: u32,
    pub layers: Vec<LayerIdx>,
    /// The object's id in its top layer.
    pub real: RealId,
}

pub struct NodeTable {
    nodes: DashMap<NodeId, Arc<Node>>,
    index: Mutex<Index>,
    pub inos: InoTable,
}

impl NodeTable {
    pub fn new(root_layers: Vec<LayerIdx>, root_real: RealId) -> NodeTable {
        let t = NodeTable {
            nodes: DashMap::new(),
            index: Mutex::new(Index::default()),
            inos: InoTable::new(root_real),
        };
        let root = Node::new(ROOT_ID, libc::S_IFDIR, Vec::new(), root_layers);
        // The kernel holds the root from the mount on.
        root.nlookup.store(1, Ordering::Relaxed);
        t.nodes.insert(ROOT_ID, Arc::new(root));
        t
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, id: NodeId) -> io::Result<Arc<Node>> {
        self.nodes
            .get(&id)
            .map(|n| n.clone())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    /// The node currently bound to (parent, name), if the kernel holds one.
    pub fn child(&self, parent: NodeId, name: &OsString) -> Option<Arc<Node>> {
        let id = *self.index().by_name.get(&(parent, name.clone()))?;
        self.nodes.get(&id).map(|n| n.clone())
    }

    /// The node bound to (parent, name), counting one more kernel lookup on it.
    pub fn touch(&self, parent: NodeId, name: &OsString) -> Option<Arc<Node>> {
        let idx = self.index();
        let id = *idx.by_name.get(&(parent, name.clone()))?;
        let n = self.nodes.get(&id).map(|n| n.clone())?;
        n.nlookup.fetch_add(1, Ordering::Relaxed);
        Some(n)
    }

    /// Binds (parent, name) to the node for `found` (made if needed) and counts one kernel
    /// lookup on it. `upper_wins`: the found object is in the upper, so the node's state
    /// follows it even if another name bound it to a lower object.
    pub fn bind(
        &self,
        parent: NodeId,
        name: OsString,
        found: Found,
        upper_wins: bool,
    ) -> Arc<Node> {
        let mut ino = self.inos.get(found.real);
        let mut idx = self.index();
        let key = (parent, name);
        let mut existing = self.nodes.get(&ino).map(|n| n.clone());
        if let Some(n) = &existing
            && (n.kind != found.kind
                || (n.read().aliases.is_empty()
                    && (found.kind != libc::S_IFREG
                        || (!upper_wins && n.read().layers.first() != found.layers.first()))))
        {
            // (Also: an alias-less file copied up since, found again below by another name
            // of the lower inode: its copy has no name left to link that name to, so the
            // name shows the lower file, as a new node, like overlayfs without index.)
            // The number belongs to a node the kernel still holds for a deleted object
            // (its FORGET not yet here, or a removed directory still someone's cwd) whose
            // inode the upper filesystem has just reused for this new object: never hand
            // the kernel that node (wrong type, stale state), give the object a new one.
            // (An alias-less regular file may be a hard link's other name: it keeps its
            // number; a deleted file's inode cannot be reused while its handle is open.)
            ino = self.inos.renew(found.real);
            existing = None;
        }
        let node = match existing {
            Some(n) => {
                let mut st = n.write();
                // The index maps every alias of a node to it (under the same lock), so it
                // answers "already an alias?" in O(1): a linear scan of the aliases made
                // listing a directory of N hard links of one file O(N^2).
                if idx.by_name.get(&key) != Some(&ino) {
                    st.aliases.push(key.clone());
                }
                if upper_wins {
                    st.layers = found.layers;
                }
                drop(st);
                n
            }
            None => {
                let n = Arc::new(Node::new(ino, found.kind, vec![key.clone()], found.layers));
                self.nodes.insert(ino, n.clone());
                n
            }
        };
        if let Some(old) = idx.by_name.insert(key.clone(), ino)
            && old != ino
            && let Some(o) = self.nodes.get(&old)
        {
            o.write().aliases.retain(|a| *a != key);
        }
        node.nlookup.fetch_add(1, Ordering::Relaxed);
        node
    }

    /// Moves every name of `old` to a new node with a new number, which its objects report
    /// from now on; `old` keeps living, nameless, for the handles open on it. The kernel has
    /// not looked the new node up yet.
    pub fn supersede(&self, old: &Node) {
        let mut idx = self.index();
        let ino = self.inos.next.fetch_add(1, Ordering::Relaxed);
        let mut st = old.write();
        let aliases = std::mem::take(&mut st.aliases);
        let node = Node::new(ino, old.kind, aliases.clone(), st.layers.clone());
        node.name_unsynced
            .store(old.name_unsynced.load(Ordering::Acquire), Ordering::Release);
        if let Some(h) = old.handle.get() {
            let _ = node.handle.set(h.clone());
        }
        old.superseded.store(true, Ordering::Release);
        drop(st);
        self.nodes.insert(ino, Arc::new(node));
        for key in aliases {
            idx.by_name.insert(key, ino);
        }
        self.inos.remap(old.ino, ino);
    }

    /// Records that `node` now lives in the upper as `real` (after copy-up or link).
    pub fn set_upper(&self, node: &Node, real: RealId) {
        self.inos.set(real, node.ino);
    }

    /// Drops the binding (parent, name); the node keeps living while the kernel holds it.
    pub fn unbind(&self, parent: NodeId, name: &OsString) {
        let mut idx = self.index();
        if let Some(id) = idx.by_name.remove(&(parent, name.clone()))
            && let Some(n) = self.nodes.get(&id)
        {
            n.write()
                .aliases
                .retain(|(p, nm)| !(*p == parent && nm == name));
        }
    }

    /// Moves the binding (p1, n1) to (p2, n2), dropping whatever (p2, n2) was bound to.
    pub fn rebind(&self, p1: NodeId, n1: &OsString, p2: NodeId, n2: OsString) {
        let mut idx = self.index();
        if let Some(old) = idx.by_name.remove(&(p2, n2.clone()))
            && let Some(n) = self.nodes.get(&old)
        {
            n.write().aliases.retain(|(p, nm)| !(*p == p2 && *nm == n2));
        }
        if let Some(id) = idx.by_name.remove(&(p1, n1.clone())) {
            if let Some(n) = self.nodes.get(&id) {
                let mut st = n.write();
                for a in st.aliases.iter_mut() {
                    if a.0 == p1 && a.1 == *n1 {
                        *a = (p2, n2.clone());
                    }
                }
            }
            idx.by_name.insert((p2, n2), id);
        }
    }

    /// Swaps the bindings of (p1, n1) and (p2, n2) (RENAME_EXCHANGE).
    pub fn exchange(&self, p1: NodeId, n1: &OsString, p2: NodeId, n2: &OsString) {
        let mut idx = self.index();
        let a = idx.by_name.remove(&(p1, n1.clone()));
        let b = idx.by_name.remove(&(p2, n2.clone()));
        let fix = |id: NodeId, from: (NodeId, &OsString), to: (NodeId, &OsString)| {
            if let Some(n) = self.nodes.get(&id) {
                for al in n.write().aliases.iter_mut() {
                    if al.0 == from.0 && al.1 == *from.1 {
                        *al = (to.0, to.1.clone());
                    }
                }
            }
        };
        if let Some(a) = a {
            fix(a, (p1, n1), (p2, n2));
            idx.by_name.insert((p2, n2.clone()), a);
        }
        if let Some(b) = b {
            fix(b, (p2, n2), (p1, n1));
            idx.by_name.insert((p1, n1.clone()), b);
        }
    }

    /// The kernel dropped `n` lookups of `id`; the node goes when none are left.
    pub fn forget(&self, id: NodeId, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut idx = self.index();
        let Some(node) = self.nodes.get(&id).map(|n| n.clone()) else {
            return;
        };
        // Every change of nlookup happens under `index`, so load/store is not racy.
        let left = node.nlookup.load(Ordering::Relaxed).saturating_sub(n);
        node.nlookup.store(left, Ordering::Relaxed);
        if left > 0 {
            return;
        }
        let st = node.read();
        for key in st.aliases.iter() {
            if idx.by_name.get(key) == Some(&id) {
                idx.by_name.remove(key);
            }
        }
        drop(st);
        self.nodes.remove(&id);
    }

    /// A name of `node` whose parent the table still holds. Hard links can keep a name whose
    /// directory the kernel has forgotten; any other name reaches the same object.
    pub fn live_alias(&self, node: &Node) -> Option<(NodeId, OsString)> {
        let st = node.read();
        st.aliases
            .iter()
            .find(|(p, _)| self.nodes.contains_key(p))
            .or(st.aliases.first())
            .cloned()
    }

    /// The path of a node relative to every layer's root ("." for the root).
    pub fn path_of(&self, node: &Node) -> io::Result<PathBuf> {
        let mut names = Vec::new();
        let mut cur = node.id;
        let mut hops = 0usize;
        while cur != ROOT_ID {
            let n = self.get(cur)?;
            let (p, name) = self
                .live_alias(&n)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
            names.push(name);
            cur = p;
            hops += 1;
            if hops > 8192 {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
        }
        if names.is_empty() {
            return Ok(PathBuf::from("."));
        }
        let mut p = PathBuf::new();
        for n in names.iter().rev() {
            p.push(n);
        }
        Ok(p)
    }
}
