"""The sending pipeline: how a due message becomes a Twilio send and a written result.

    messages due (pending, or a lease that ran out)
      │   wakeups.py     LISTEN outbox_due (debounced by a few ms), a timer at the
      │                  earliest retry, a poll
      ▼
    claim ............. pipeline.py    SendingPipeline: store.claim_due_messages in batches,
      │                                FOR UPDATE SKIP LOCKED under a lease, one round
      │                                trip (a SQL function); or direct dispatch: an
      │                                enqueue of this process (../enqueue.py) inserts
      │                                what the pipeline has room for already claimed
      │                                and hands it over (SendingPipeline.reserve)
      │                 leases.py      renews the leases of what is held
      ▼
    consent ........... consent.py     BatchConsent: one routing CheckOptOuts per claimed batch
      │                                (clients.py); refresh_consent keeps waiting answers fresh
      ▼
    per-sender lanes .. pipeline.py    a token bucket per sender, round-robin across tenants,
      │                                at most max_in_flight sends at once
      ▼
    send .............. send.py        MessageDelivery.resolve: settle an earlier unknown
      │                                outcome first, consent fresh enough, WhatsApp window,
      │                 twilio_api.py  then TwilioSender.send
      ▼
    classify .......... twilio_api.py  every answer a SendAccepted or a SendFailure
      │                                (domain.classify_http_error: retryable, permanent,
      │                                outcome unknown)
      ▼
    retry / dead-letter / reconcile
      │ ............... resolutions.py the claim's Resolution: sent, blocked, later, dead,
      │                                after_failure (retry, dead letter or reconcile)
      │ ............... reconcile.py   which listed Twilio message an unconfirmed attempt
      │                                created (run by send.py on the next claim)
      ▼
    write results ..... writer.py      ResultWriter: batches of Resolutions, one statement each
                                       (store.record_resolutions: status, attempts, events)

Safe with any number of processes: a message is held by one process under a lease, and a
lease lost to another process is never written over. `__main__` runs one `SendingPipeline`
per process (`OUTBOX_WORKER_ENABLED`).
"""
