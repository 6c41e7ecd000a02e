//! TODO: written in this milestone.
