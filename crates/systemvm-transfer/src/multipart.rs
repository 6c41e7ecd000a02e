//! The file of a `multipart/form-data` upload (what the Mold UI's "Upload from local" posts: the
//! file in field `files[]`), streamed chunk by chunk with [`multer`].
//!
//! Invariants: the file's bytes are handed out as they arrive (nothing is buffered beyond
//! multer's look-ahead for the boundary); [`FilePart::next_chunk`] returns `Ok(None)` only after
//! the whole body was read up to its closing boundary and found to hold exactly one file part
//! (text fields are allowed, up to [`MAX_TEXT_FIELD`] bytes each and [`MAX_TEXT_FIELDS`] of
//! them). So a caller that installs only on `Ok(None)` never installs a truncated body, a body
//! with two files, or a file whose name is a path.

use bytes::Bytes;
use futures_util::Stream;

/// Largest text field (a form's other inputs) accepted beside the file.
pub const MAX_TEXT_FIELD: usize = 64 * 1024;
/// Most text fields accepted beside the file.
pub const MAX_TEXT_FIELDS: usize = 32;

/// Why an upload body is refused. Messages are safe to show to the browser.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    /// The Content-Type is not `multipart/form-data` with a boundary.
    #[error("the upload must be multipart/form-data with a boundary")]
    NotMultipart,
    /// The body holds no part with a file name.
    #[error("the upload holds no file part")]
    NoFilePart,
    /// The body holds a second file part.
    #[error("the upload holds more than one file part")]
    TwoFileParts,
    /// The file name is a path.
    #[error("the file name {0:?} is not a plain file name")]
    PathInFileName(String),
    /// Too many or too large text fields.
    #[error("the upload's form fields are too large")]
    FieldsTooLarge,
    /// The body ended before its closing boundary.
    #[error("the upload ended before its closing boundary (truncated body)")]
    Truncated,
    /// Reading the body failed (the connection dropped, or a limit stopped it).
    #[error("reading the upload failed: {0}")]
    Read(String),
    /// The body is not valid multipart.
    #[error("the upload is not valid multipart/form-data: {0}")]
    Malformed(String),
}

fn map(e: multer::Error) -> MultipartError {
    match e {
        multer::Error::IncompleteStream
        | multer::Error::IncompleteFieldData { .. }
        | multer::Error::IncompleteHeaders => MultipartError::Truncated,
        multer::Error::StreamReadFailed(e) => MultipartError::Read(e.to_string()),
        multer::Error::NoBoundary | multer::Error::NoMultipart => MultipartError::NotMultipart,
        other => MultipartError::Malformed(other.to_string()),
    }
}

/// Reads the boundary of a `multipart/form-data` Content-Type.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let lower = content_type.trim_start().to_ascii_lowercase();
    if !lower.starts_with("multipart/form-data") {
        return Err(MultipartError::NotMultipart);
    }
    multer::parse_boundary(content_type).map_err(|_| MultipartError::NotMultipart)
}

/// The one file of a multipart upload.
pub struct FilePart<'r> {
    multipart: multer::Multipart<'r>,
    field: Option<multer::Field<'r>>,
    file_name: Option<String>,
    state: Stage,
    text_fields: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    BeforeFile,
    InFile,
    AfterFile,
    Done,
}

impl std::fmt::Debug for FilePart<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilePart")
            .field("file_name", &self.file_name)
            .finish_non_exhaustive()
    }
}

impl<'r> FilePart<'r> {
    /// Reads `body` as multipart with `boundary` (see [`boundary`]).
    pub fn new<S, E>(body: S, boundary: String) -> Self
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'r,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'r,
    {
        FilePart {
            multipart: multer::Multipart::new(body, boundary),
            field: None,
            file_name: None,
            state: Stage::BeforeFile,
            text_fields: 0,
        }
    }

    /// The client's file name, once the file part began.
    pub fn file_name(&self) -> Option<&str> {
        self.file_name.as_deref()
    }

    /// The next chunk of the file; `Ok(None)` once the file and the whole body ended well.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        loop {
            match self.state {
                Stage::Done => return Ok(None),
                Stage::InFile => {
                    let Some(field) = self.field.as_mut() else {
                        self.state = Stage::AfterFile;
                        continue;
                    };
                    match field.chunk().await.map_err(map)? {
                        Some(chunk) if chunk.is_empty() => continue,
                        Some(chunk) => return Ok(Some(chunk)),
                        None => {
                            self.field = None;
                            self.state = Stage::AfterFile;
                        }
                    }
                }
                Stage::BeforeFile | Stage::AfterFile => {
                    let Some(mut field) = self.multipart.next_field().await.map_err(map)? else {
                        if self.state == Stage::BeforeFile {
                            return Err(MultipartError::NoFilePart);
                        }
                        self.state = Stage::Done;
                        return Ok(None);
                    };
                    if let Some(name) = field.file_name() {
                        if self.state == Stage::AfterFile {
                            return Err(MultipartError::TwoFileParts);
                        }
                        if !crate::plain_file_name(name) {
                            return Err(MultipartError::PathInFileName(name.chars().take(64).collect()));
                        }
                        self.file_name = Some(name.to_owned());
                        self.field = Some(field);
                        self.state = Stage::InFile;
                        continue;
                    }
                    self.text_fields += 1;
                    if self.text_fields > MAX_TEXT_FIELDS {
                        return Err(MultipartError::FieldsTooLarge);
                    }
                    let mut len = 0usize;
                    while let Some(chunk) = field.chunk().await.map_err(map)? {
                        len += chunk.len();
                        if len > MAX_TEXT_FIELD {
                            return Err(MultipartError::FieldsTooLarge);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const B: &str = "XyZ";

    fn part(name: &str, file: Option<&str>, data: &[u8]) -> Vec<u8> {
        let mut out = format!("--{B}\r\nContent-Disposition: form-data; name=\"{name}\"").into_bytes();
        if let Some(f) = file {
            out.extend_from_slice(
                format!("; filename=\"{f}\"\r\nContent-Type: application/octet-stream").as_bytes(),
            );
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        out
    }

    fn end() -> Vec<u8> {
        format!("--{B}--\r\n").into_bytes()
    }

    async fn read(body: Vec<u8>, chunk: usize) -> Result<Vec<u8>, MultipartError> {
        let chunks: Vec<Result<Bytes, std::io::Error>> = body
            .chunks(chunk.max(1))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut p = FilePart::new(futures_util::stream::iter(chunks), B.to_owned());
        let mut out = Vec::new();
        while let Some(c) = p.next_chunk().await? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn streams_the_one_file() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let body = [
            part("name", None, b"x"),
            part("files[]", Some("a.qcow2"), &data),
            part("z", None, b"y"),
            end(),
        ]
        .concat();
        for chunk in [1, 7, 4096, body.len()] {
            assert_eq!(read(body.clone(), chunk).await.unwrap(), data, "chunk {chunk}");
        }
    }

    #[tokio::test]
    async fn refuses_what_is_not_one_plain_complete_file() {
        let f = part("files[]", Some("a.iso"), b"data");
        assert_eq!(
            read([part("a", None, b"1"), end()].concat(), 5).await,
            Err(MultipartError::NoFilePart)
        );
        assert_eq!(
            read([f.clone(), part("b", Some("b.iso"), b"x"), end()].concat(), 5).await,
            Err(MultipartError::TwoFileParts)
        );
        assert!(matches!(
            read([part("f", Some("../../etc/passwd"), b"x"), end()].concat(), 5).await,
            Err(MultipartError::PathInFileName(_))
        ));
        // Truncated: no closing boundary, or cut inside the file.
        assert_eq!(read(f.clone(), 3).await, Err(MultipartError::Truncated));
        assert_eq!(
            read(f[..f.len() - 4].to_vec(), 3).await,
            Err(MultipartError::Truncated)
        );
        let big = part("t", None, &vec![b'a'; MAX_TEXT_FIELD + 1]);
        assert_eq!(
            read([big, f, end()].concat(), 4096).await,
            Err(MultipartError::FieldsTooLarge)
        );
        assert_eq!(boundary("application/json"), Err(MultipartError::NotMultipart));
        assert_eq!(boundary("multipart/form-data; boundary=abc").unwrap(), "abc");
        assert_eq!(boundary("multipart/form-data"), Err(MultipartError::NotMultipart));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..64) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _ = rt.block_on(read(body, chunk));
        }

        #[test]
        fn any_file_content_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..512) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let body = [part("files[]", Some("x.raw"), &data), end()].concat();
            prop_assert_eq!(rt.block_on(read(body, chunk)).unwrap(), data);
        }
    }
}
