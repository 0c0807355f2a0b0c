//! DCV placement Requirements: parsing and evaluation (in progress).
