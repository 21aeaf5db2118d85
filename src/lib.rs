//! unionmount: a userspace (FUSE) union filesystem with overlayfs semantics, for container
//! images. Data flows one way: CLI → options → layers → union → FUSE adapter.

pub mod cli;
pub mod commit;
pub mod fuse;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod imagecmd;
pub mod layer;
pub mod options;
pub mod store;
pub mod sys;
pub mod union;
