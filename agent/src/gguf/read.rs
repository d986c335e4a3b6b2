//! (in progress)
/// placeholder
#[derive(Debug)]
pub struct GgufError;
/// placeholder
#[derive(Debug)]
pub struct GgufFile;
/// placeholder
#[derive(Debug)]
pub struct TensorInfo;
/// placeholder
pub fn read_header() {}
/// placeholder
pub fn read_model() {}
