"""Open and click tracking, unsubscribe and preference pages, provider webhooks (SES, Twilio)."""

from __future__ import annotations

from flask import Flask

from whistle_web.extensions import csrf


def init_app(app: Flask) -> None:
    from whistle_web.tracking import preference_page, sns, views

    # Where SNS signing certificates and subscription confirmations may be fetched from.
    app.config.setdefault("WHISTLE_SNS_CERT_URL_PATTERN", sns.DEFAULT_URL_PATTERN)
    app.config.setdefault("WHISTLE_SNS_SUBSCRIBE_URL_PATTERN", sns.DEFAULT_URL_PATTERN)
    # Webhooks authenticate by signature, not cookies.
    csrf.exempt(views.ses_webhook)
    csrf.exempt(views.twilio_webhook)
    # Checks the form token itself, except for RFC 8058 one-click POSTs from mail providers.
    csrf.exempt(views.unsubscribe)
    app.register_blueprint(views.bp)
    app.register_blueprint(preference_page.bp)
