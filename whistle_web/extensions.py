"""Extensions created unbound; ``create_app`` binds them."""

from __future__ import annotations

from flask_htmx import HTMX
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_sock import Sock
from flask_sqlalchemy import SQLAlchemy
from flask_wtf.csrf import CSRFProtect

from whistle_web.db import Base
from whistle_web.tenancy import TenantSession

db = SQLAlchemy(model_class=Base, session_options={"class_": TenantSession})
migrate = Migrate()
login_manager = LoginManager()
csrf = CSRFProtect()
htmx = HTMX()
sock = Sock()
