"""Sign-in, sign-out and the dashboard."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required, logout_user
from sqlalchemy import func, select

from whistle_web.accounts.services import authenticate, memberships_of
from whistle_web.console.auth import reset_session
from whistle_web.console.forms import LoginForm
from whistle_web.extensions import db
from whistle_web.models import (
    Campaign,
    CampaignStatus,
    DeliveryStat,
    Recipient,
    StatScope,
    Template,
)

bp = Blueprint("console", __name__)


def _safe_next(target: str | None) -> str | None:
    """Only follow same-site relative paths after sign-in (no open redirect)."""
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return None
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():  # type: ignore[no-untyped-def]
    if current_user.is_authenticated:
        return redirect(url_for("console.dashboard"))
    from whistle_web.console import account

    form = LoginForm()
    if form.validate_on_submit():
        email = (form.email.data or "").strip().lower()
        if not account.login_allowed(email):
            form.form_errors.append("Too many failed sign-ins. Wait a few minutes and try again.")
            return render_template("console/login.html", form=form), 429
        user = authenticate(email, form.password.data or "")
        memberships = memberships_of(user.id) if user is not None else []
        if user is not None and memberships:
            account.start_session(user, memberships[0].organization_id)
            user.last_login_at = datetime.now(UTC)
            db.session.commit()
            return redirect(_safe_next(request.args.get("next")) or url_for("console.dashboard"))
        account.record_login_failure(email)
        # One message whatever was wrong: no hint whether the email exists.
        form.form_errors.append("Email or password is incorrect.")
        return render_template("console/login.html", form=form), 401
    status = 422 if form.errors else 200
    return render_template("console/login.html", form=form), status


@bp.post("/logout")
@login_required
def logout():  # type: ignore[no-untyped-def]
    logout_user()
    reset_session()
    flash("You are signed out.", "info")
    return redirect(url_for("console.login"))


@bp.get("/")
@login_required
def dashboard():  # type: ignore[no-untyped-def]
    if g.membership is None:
        abort(403)
    organization = g.organization
    since = datetime.now(UTC) - timedelta(days=7)
    rows = db.session.execute(
        select(DeliveryStat.channel, DeliveryStat.metric, func.sum(DeliveryStat.value))
        .where(DeliveryStat.scope == StatScope.ORGANIZATION, DeliveryStat.bucket >= since)
        .group_by(DeliveryStat.channel, DeliveryStat.metric)
    ).all()
    by_channel: dict[str, dict[str, int]] = {}
    for channel, metric, value in rows:
        by_channel.setdefault(str(channel), {})[metric] = int(value)
    totals: dict[str, int] = {}
    for metrics in by_channel.values():
        for metric, value in metrics.items():
            totals[metric] = totals.get(metric, 0) + value
    campaign_counts = dict(
        db.session.execute(select(Campaign.status, func.count()).group_by(Campaign.status)).all()
    )
    recent = db.session.scalars(select(Campaign).order_by(Campaign.id.desc()).limit(5)).all()
    return render_template(
        "console/dashboard.html",
        organization=organization,
        recipients=db.session.scalar(select(func.count()).select_from(Recipient)),
        templates=db.session.scalar(select(func.count()).select_from(Template)),
        campaign_counts={CampaignStatus(k): v for k, v in campaign_counts.items()},
        recent_campaigns=recent,
        by_channel=dict(sorted(by_channel.items())),
        totals=totals,
    )
