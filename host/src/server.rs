//! TODO
pub async fn serve() {}
