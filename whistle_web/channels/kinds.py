"""Channels and the provider kinds that serve each of them."""

from __future__ import annotations

import enum


class Channel(enum.StrEnum):
    EMAIL = "email"
    SMS = "sms"
    PUSH = "push"
    IN_APP = "in_app"
    WEBHOOK = "webhook"


class ProviderKind(enum.StrEnum):
    SMTP = "smtp"
    SES = "ses"
    TWILIO = "twilio"
    SNS = "sns"
    FCM = "fcm"
    WEBPUSH = "webpush"
    IN_APP = "in_app"
    WEBHOOK = "webhook"


PROVIDER_CHANNEL = {
    ProviderKind.SMTP: Channel.EMAIL,
    ProviderKind.SES: Channel.EMAIL,
    ProviderKind.TWILIO: Channel.SMS,
    ProviderKind.SNS: Channel.SMS,
    ProviderKind.FCM: Channel.PUSH,
    ProviderKind.WEBPUSH: Channel.PUSH,
    ProviderKind.IN_APP: Channel.IN_APP,
    ProviderKind.WEBHOOK: Channel.WEBHOOK,
}

# The device kind each push provider kind delivers to (recipients.models.DeviceKind values).
PUSH_DEVICE_KINDS = {ProviderKind.FCM: "fcm", ProviderKind.WEBPUSH: "webpush"}
