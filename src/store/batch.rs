//! PostgreSQL: one statement for many callers. A saga consumer handles up
//! to 256 orders at once, and each of them appends events, asks the same
//! small questions (what does this order hold on this product, was this
//! notification sent) and writes the same small rows (a notification
//! attempt). Sent one by one, every such statement costs the server a round
//! trip, a parse-bind-execute and, for a write, a commit flushed to disk;
//! sharing the appends' statements and commits took a quarter off
//! PostgreSQL's CPU per order (ARCHITECTURE.md, "Performance", "PostgreSQL
//! statements shared by the callers that arrive together").
//!
//! A [`Batcher`] owns a task that takes every request waiting (up to a
//! batch), runs them as one statement, and answers each caller. While that
//! statement runs, new requests queue, and the next statement takes them
//! all: alone, a request runs at once; under load, requests share
//! statements without waiting for a timer. A batch's statement is one
//! implicit transaction, as each request's own statement was, and starts
//! after every request in it was made: it sees everything committed before
//! any of them asked. If it fails, every request in it fails with its
//! error, as its own statement would have (appends instead run again one
//! by one: `postgres.rs`).

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// A request and where its answer goes.
type Waiting<Req, Res> = (Req, oneshot::Sender<Result<Res, String>>);

/// Runs requests of one kind together; see the module documentation.
#[derive(Debug)]
pub(super) struct Batcher<Req, Res> {
    queue: mpsc::UnboundedSender<Waiting<Req, Res>>,
}

impl<Req: Send + 'static, Res: Send + 'static> Batcher<Req, Res> {
    /// Starts the batching task on the current runtime. `run` gets up to
    /// `max` requests and answers with one result per request, in order.
    pub(super) fn spawn<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Res>, StoreError>> + Send,
    {
        let (queue, mut waiting) = mpsc::unbounded_channel::<Waiting<Req, Res>>();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            while waiting.recv_many(&mut batch, max).await > 0 {
                let (requests, answers): (Vec<Req>, Vec<_>) = batch.drain(..).unzip();
                let asked = requests.len();
                let error = match run(requests).await {
                    Ok(results) if results.len() == asked => {
                        for (answer, result) in answers.into_iter().zip(results) {
                            // A caller that stopped waiting needs no answer.
                            let _ = answer.send(Ok(result));
                        }
                        continue;
                    }
                    Ok(results) => {
                        format!("a batch of {asked} requests got {} answers", results.len())
                    }
                    Err(e) => e.to_string(),
                };
                for answer in answers {
                    let _ = answer.send(Err(error.clone()));
                }
            }
        });
        Batcher { queue }
    }

    /// Runs `request` in the next batch and returns its answer.
    pub(super) async fn run(&self, request: Req) -> Result<Res, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send((request, answer))
            .map_err(|_| StoreError::Batched("the batching task has stopped".to_string()))?;
        answered
            .await
            .map_err(|_| StoreError::Batched("the batching task has stopped".to_string()))?
            .map_err(StoreError::Batched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn concurrent_requests_share_runs_and_each_gets_its_own_answer() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let doubler = Arc::new(Batcher::spawn(64, move |requests: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                // Long enough for the other requests to queue behind it.
                tokio::task::yield_now().await;
                Ok(requests.into_iter().map(|n| n * 2).collect())
            }
        }));
        let calls: Vec<_> = (0..200u32)
            .map(|n| {
                let doubler = doubler.clone();
                tokio::spawn(async move { (n, doubler.run(n).await) })
            })
            .collect();
        for call in calls {
            let (n, answer) = call.await.expect("request task");
            assert_eq!(answer.expect("answer"), n * 2);
        }
        let runs = runs.load(Ordering::SeqCst);
        assert!(runs < 200, "200 requests took {runs} runs");
    }

    #[tokio::test]
    async fn a_failed_run_fails_every_request_in_it() {
        let failing = Batcher::spawn(8, |_: Vec<u32>| async {
            Err::<Vec<u32>, _>(StoreError::CorruptRow("no such row".to_string()))
        });
        let error = failing.run(1).await.expect_err("the run failed");
        assert!(error.to_string().contains("no such row"), "{error}");
    }

    #[tokio::test]
    async fn a_run_answering_too_few_fails_rather_than_misanswering() {
        let short = Batcher::spawn(8, |_: Vec<u32>| async { Ok(Vec::<u32>::new()) });
        let error = short.run(1).await.expect_err("no answer for the request");
        assert!(error.to_string().contains("got 0 answers"), "{error}");
    }
}
