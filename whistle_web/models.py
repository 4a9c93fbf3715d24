"""Import every domain's models so SQLAlchemy and Alembic see the whole schema."""

from whistle_web.accounts.models import ApiKey, Membership, Role, User
from whistle_web.api.models import IdempotencyRecord, RefreshToken
from whistle_web.audiences.models import Segment, Subscription, Topic
from whistle_web.campaigns.models import AudienceType, Campaign, CampaignStatus
from whistle_web.channels.models import Provider
from whistle_web.deliveries.models import (
    BatchStatus,
    Delivery,
    DeliveryBatch,
    DeliveryEvent,
    DeliveryLinkStat,
    DeliveryStat,
    StatScope,
)
from whistle_web.message_templates.models import Template, TemplateVersion, VersionState
from whistle_web.notifications.models import (
    Notification,
    SendRequest,
    SendRequestKind,
    SendRequestStatus,
)
from whistle_web.organizations.models import AuditLog, Organization
from whistle_web.preferences.models import Category, Preference, Suppression, SuppressionReason
from whistle_web.recipients.models import Device, DeviceKind, Recipient

__all__ = [
    "ApiKey",
    "AudienceType",
    "AuditLog",
    "BatchStatus",
    "Campaign",
    "CampaignStatus",
    "Category",
    "Delivery",
    "DeliveryBatch",
    "DeliveryEvent",
    "DeliveryLinkStat",
    "DeliveryStat",
    "Device",
    "DeviceKind",
    "IdempotencyRecord",
    "Membership",
    "Notification",
    "Organization",
    "Preference",
    "Provider",
    "Recipient",
    "RefreshToken",
    "Role",
    "Segment",
    "SendRequest",
    "SendRequestKind",
    "SendRequestStatus",
    "StatScope",
    "Subscription",
    "Suppression",
    "SuppressionReason",
    "Template",
    "TemplateVersion",
    "Topic",
    "User",
    "VersionState",
]
