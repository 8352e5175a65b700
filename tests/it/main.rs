//! vessel's one integration-test binary. Each module covers one capability; helpers live in
//! `support`.

mod hostile;
mod hygiene;
mod support;
mod validate;
