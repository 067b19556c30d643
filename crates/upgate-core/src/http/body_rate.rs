//! The minimum body data rate: a body that trickles is dropped (408), as a stalled one is.
//!
//! What flows through here: the body of every request on the dialect listener, wrapped
//! before any handler reads it. After `server.min_body_rate_grace` from the start of the
//! body, the bytes received so far must average at least `server.min_body_rate` per
//! second (Kestrel's `MinRequestBodyDataRate`); below it the stream ends with a timed-out
//! error, which every dialect answers as its 408. A body that sends nothing at all is the
//! idle timeout's (`server.idle_timeout`). `min_body_rate: 0` turns the check off.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use futures_util::Stream;

use crate::upload::Gateway;

/// A body stream that fails once its average rate falls below the minimum.
struct PacedBody {
    inner: Payload,
    started: Instant,
    received: u64,
    min_rate: u64,
    grace: Duration,
}

impl PacedBody {
    fn too_slow(&self) -> bool {
        let elapsed = self.started.elapsed();
        elapsed > self.grace && (self.received as f64) < self.min_rate as f64 * elapsed.as_secs_f64()
    }
}

impl Stream for PacedBody {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = Pin::new(&mut self.inner).poll_next(context);
        if let Poll::Ready(Some(Ok(bytes))) = &polled {
            self.received += bytes.len() as u64;
            if self.too_slow() {
                return Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the request body is slower than the minimum data rate",
                )))));
            }
        }
        polled
    }
}

pub(crate) async fn enforce(
    mut request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let limits = request.app_data::<web::Data<Gateway>>().map(|gateway| {
        let server = &gateway.policy().config.server;
        (server.min_body_rate.0, server.min_body_rate_grace.0)
    });
    if let Some((min_rate, grace)) = limits
        && min_rate > 0
    {
        let inner = std::mem::replace(request.parts_mut().1, Payload::None);
        let paced = PacedBody {
            inner,
            started: Instant::now(),
            received: 0,
            min_rate,
            grace,
        };
        request.set_payload(Payload::Stream {
            payload: Box::pin(paced),
        });
    }
    next.call(request).await
}
