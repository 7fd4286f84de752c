"""Gateway: Twilio's webhooks in, JetStream out."""
