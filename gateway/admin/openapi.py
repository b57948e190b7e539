"""The OpenAPI 3.1 document of the admin API (`GET /admin/openapi.json`)."""

from __future__ import annotations

from typing import Any

_NULLABLE_STRING = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_INSTANT = {"type": "string", "format": "date-time"}
_NULLABLE_INSTANT = {"type": ["string", "null"], "format": "date-time"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _problem("invalid-request: the `errors` name each bad field"),
    "401": _problem("invalid-token: missing or invalid credentials"),
    "403": _problem("forbidden: a valid JWT without the admin scope"),
}
_TENANT = {"name": "tenant", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"}}
_METER = {"name": "meter", "in": "path", "required": True,
          "description": "a configured meter, or `rate` for the per-second rate limit",
          "schema": {"type": "string"}}
_LIMIT = {"name": "limit", "in": "query",
          "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}}
_CURSOR = {"name": "cursor", "in": "query", "description": "`next_cursor` of the previous page (opaque)",
           "schema": {"type": "string"}}

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object", "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri"}, "title": {"type": "string"},
            "status": {"type": "integer"}, "detail": {"type": "string"},
            "errors": {"type": "array", "items": {
                "type": "object", "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
        },
    },
    "MeterUsage": {
        "type": "object",
        "required": ["used", "limit", "remaining", "resets_at", "on_exceed", "source", "forecast"],
        "properties": {
            "used": {"type": "number"}, "limit": _NULLABLE_NUMBER, "remaining": _NULLABLE_NUMBER,
            "shadow_limit": {**_NULLABLE_NUMBER, "description": "a limit of enforce: shadow: reported, never enforced"},
            "resets_at": {**_NULLABLE_INSTANT,
                          "description": "the period end; null for gauges, which never reset"},
            "on_exceed": {"enum": ["reject", "overage", None]},
            "source": {"enum": ["plan", "override"]},
            "forecast": {"type": "number", "description": "end-of-period value at the current pace"},
        },
    },
    "TenantView": {
        "type": "object",
        "required": ["tenant", "plan", "status", "period", "rate", "meters", "alerts"],
        "properties": {
            "tenant": {"type": "string"}, "plan": _NULLABLE_STRING,
            "status": {"enum": ["active", "suspended"]}, "subscription_status": _NULLABLE_STRING,
            "stripe_customer_id": _NULLABLE_STRING, "stripe_subscription_id": _NULLABLE_STRING,
            "billing_anchor_day": _NULLABLE_INT,
            "period": {"type": "object", "required": ["start", "end"],
                       "properties": {"start": _INSTANT, "end": _INSTANT}},
            "rate": {"type": "object", "required": ["per_second", "burst", "source"],
                     "properties": {"per_second": _NULLABLE_NUMBER, "burst": _NULLABLE_INT,
                                    "source": {"enum": ["plan", "override"]},
                                    "shadow": {"type": ["object", "null"], "properties": {
                                        "per_second": {"type": "number"}, "burst": {"type": "integer"}}}}},
            "meters": {"type": "object", "additionalProperties": _ref("MeterUsage")},
            "shadow_rejections": {
                "type": "array", "description": "admin view only: requests served this period that a shadow limit "
                                                "would have refused (the first per request)",
                "items": {"type": "object", "required": ["reason", "meter", "count"],
                          "properties": {"reason": {"enum": ["rate", "quota", "guard"]}, "meter": {"type": "string"},
                                         "count": {"type": "integer"}}}},
            "alerts": {"type": "array", "items": {
                "type": "object", "properties": {"meter": {"type": "string"}, "threshold": {"type": "number"},
                                                 "at": _INSTANT}}},
        },
    },
    "TenantSummary": {
        "type": "object", "required": ["tenant", "plan", "status", "registered"],
        "properties": {
            "tenant": {"type": "string"}, "plan": _NULLABLE_STRING,
            "status": {"enum": ["active", "suspended"]},
            "subscription_status": _NULLABLE_STRING, "stripe_customer_id": _NULLABLE_STRING,
            "billing_anchor_day": _NULLABLE_INT,
            "registered": {"type": "boolean", "description": "false: the tenant has only sent traffic"},
        },
    },
    "TenantPage": {
        "type": "object", "required": ["tenants", "next_cursor"],
        "properties": {"tenants": {"type": "array", "items": _ref("TenantSummary")},
                       "next_cursor": _NULLABLE_STRING},
    },
    "TenantUpdate": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "plan": {"type": "string"}, "status": {"enum": ["active", "suspended"]},
            "stripe_customer_id": _NULLABLE_STRING,
            "billing_anchor_day": {"type": ["integer", "null"], "minimum": 1, "maximum": 28},
        },
    },
    "OverrideUpdate": {
        "oneOf": [
            {"type": "object", "additionalProperties": False, "required": ["limit"],
             "description": "any meter but `rate`",
             "properties": {"limit": {"type": ["integer", "null"], "minimum": 0},
                            "expires_at": _NULLABLE_INSTANT, "reason": _NULLABLE_STRING,
                            "enforce": {"enum": ["on", "shadow", None]}}},
            {"type": "object", "additionalProperties": False, "required": ["per_second"],
             "description": "meter `rate`",
             "properties": {"per_second": {"type": ["number", "null"], "exclusiveMinimum": 0},
                            "burst": {"type": ["integer", "null"], "minimum": 1},
                            "expires_at": _NULLABLE_INSTANT, "reason": _NULLABLE_STRING,
                            "enforce": {"enum": ["on", "shadow", None]}}},
        ],
    },
    "PlanCatalog": {
        "type": "object", "required": ["plans"],
        "properties": {
            "default_plan": _NULLABLE_STRING,
            "plans": {"type": "object", "additionalProperties": {
                "type": "object", "properties": {
                    "rate": {"type": ["object", "null"], "properties": {
                        "per_second": {"type": "number"}, "burst": {"type": "integer"}}},
                    "shadow_rate": {"type": ["object", "null"], "properties": {
                        "per_second": {"type": "number"}, "burst": {"type": "integer"}}},
                    "quotas": {"type": "object", "additionalProperties": {
                        "type": "object", "properties": {
                            "limit": _NULLABLE_NUMBER, "shadow_limit": _NULLABLE_NUMBER,
                            "on_exceed": {"enum": ["reject", "overage"]},
                            "guards": {"type": "array", "items": {"type": "object", "properties": {
                                "method": _NULLABLE_STRING, "path": {"type": "string"}}}}}}}}}},
        },
    },
    "AuditEntry": {
        "type": "object", "required": ["at", "actor", "tenant", "action", "before", "after"],
        "properties": {
            "id": {"type": "integer"}, "at": _INSTANT,
            "actor": {"type": "string", "description": "`token:<name>` or `jwt:<subject>`"},
            "tenant": _NULLABLE_STRING,
            "action": {"enum": ["tenant.create", "tenant.update", "override.put", "override.delete"]},
            "before": {"type": ["object", "null"]}, "after": {"type": ["object", "null"]},
        },
    },
    "AuditPage": {
        "type": "object", "required": ["entries", "next_cursor"],
        "properties": {"entries": {"type": "array", "items": _ref("AuditEntry")},
                       "next_cursor": _NULLABLE_STRING},
    },
}


_SYNC_PATHS: dict[str, Any] = {
    "/admin/sync": {"get": {
        "summary": "Billing sync state: last run, lag, pending, sent, parked buckets", "operationId": "getSync",
        "responses": {"200": _json("sync state", _ref("SyncState")), **_ERRORS}}},
    "/admin/sync/run": {"post": {
        "summary": "Run one sync pass now (takes the sync leader lock)", "operationId": "runSync",
        "responses": {"200": _json("the pass and the state after it", {
            "type": "object", "properties": {"pass": {"type": "object"}, "state": _ref("SyncState")}}),
            **_ERRORS}}},
    "/admin/sync/parked/{identifier}/requeue": {"post": {
        "summary": "Make one parked ledger row pending again (after fixing its cause); audited as sync.requeue",
        "operationId": "requeueParked",
        "parameters": [{"name": "identifier", "in": "path", "required": True,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 100}}],
        "responses": {"200": _json("the row, now pending", {"type": "object", "properties": {
            "identifier": {"type": "string"}, "tenant": {"type": "string"}, "meter": {"type": "string"},
            "bucket_start": {"type": "string", "format": "date-time"}, "state": {"type": "string"},
            "reason": {"type": ["string", "null"]}, "attempts": {"type": "integer"}}}), **_ERRORS}}},
}
_SYNC_STATE = {
    "type": "object", "required": ["last_run_at", "lag_seconds", "pending", "sent_total", "parked"],
    "properties": {
        "last_run_at": {"type": ["string", "null"], "format": "date-time"},
        "lag_seconds": {"type": "number"}, "pending": {"type": "integer"}, "sent_total": {"type": "integer"},
        "parked": {"type": "array", "items": {"type": "object", "properties": {
            "tenant": {"type": "string"}, "meter": {"type": "string"},
            "bucket_start": {"type": "string", "format": "date-time"}, "reason": {"type": ["string", "null"]}}}},
    },
}


_HISTORY_QUERY = [
    {"name": "meter", "in": "query", "description": "billed meters (repeated or comma-separated); default: all",
     "schema": {"type": "string"}},
    {"name": "step", "in": "query", "description": "UTC hours or days", "schema": {"enum": ["hour", "day"],
                                                                                    "default": "day"}},
    {"name": "from", "in": "query", "description": "RFC 3339 (or a date), rounded down to the step; default: the "
     "start of the current billing period (the tenant's anchor day), at most 400 steps before `to`",
     "schema": _INSTANT},
    {"name": "to", "in": "query", "description": "RFC 3339 (or a date), rounded up to the step, after `from`; "
     "default: the end of the current step. At most 400 steps from `from`", "schema": _INSTANT},
]
_HISTORY_ANSWER = {"description": "every step of the range per meter; `Accept: text/csv` gives `start,meter,value` "
                                  "rows (RFC 4180, empty where JSON has null)",
                   "content": {"application/json": {"schema": _ref("UsageHistory")},
                               "text/csv": {"schema": {"type": "string"}}}}
_UNAVAILABLE = _problem("limiter-unavailable / database-unavailable: a store is down; overloaded: too many history "
                        "reads at once (Retry-After)")
_HISTORY_PATHS: dict[str, Any] = {
    "/admin/tenants/{tenant}/usage": {
        "parameters": [_TENANT],
        "get": {"summary": "Usage history: a series per billed meter from the ledger and the open buckets",
                "operationId": "getTenantUsageHistory", "parameters": _HISTORY_QUERY,
                "responses": {"200": _HISTORY_ANSWER, **_ERRORS, "404": _problem("never seen"),
                              "503": _UNAVAILABLE}}},
    "/_gateway/usage/history": {
        "servers": [{"url": "/", "description": "the proxy listener (not the admin listener)"}],
        "get": {"summary": "The caller's own usage history (as getTenantUsageHistory, for the token's tenant)",
                "operationId": "getOwnUsageHistory", "parameters": _HISTORY_QUERY,
                "security": [{"tenant_jwt": []}],
                "responses": {"200": _HISTORY_ANSWER, "400": _ERRORS["400"], "401": _ERRORS["401"],
                              "503": _UNAVAILABLE}}},
}
_USAGE_HISTORY = {
    "type": "object", "required": ["tenant", "step", "from", "to", "series"],
    "properties": {
        "tenant": {"type": "string"}, "step": {"enum": ["hour", "day"]}, "from": _INSTANT, "to": _INSTANT,
        "series": {"type": "object", "additionalProperties": {"type": "array", "items": {
            "type": "object", "required": ["start", "value"],
            "properties": {"start": _INSTANT, "value": {
                **_NULLABLE_NUMBER, "description": "a counter: the step's sum (exact; refunds may make it "
                                                   "negative); a gauge: its last value in the step, null if none"}}}}},
    },
}


_PROXY_LISTENER = [{"url": "/", "description": "the proxy listener (not the admin listener)"}]
_PORTAL_PATHS: dict[str, Any] = {
    "/_gateway/portal-link": {
        "servers": _PROXY_LISTENER,
        "post": {"summary": "A signed one-time link (10 minutes) to the caller's usage page, for a browser",
                 "operationId": "createPortalLink", "security": [{"tenant_jwt": []}],
                 "responses": {
                     "200": _json("the link: its first GET opens the page (a 30-minute session), later ones are 410",
                                  {"type": "object", "required": ["url", "expires_at"],
                                   "properties": {"url": {"type": "string", "format": "uri"},
                                                  "expires_at": _INSTANT}}),
                     "400": _problem("invalid-request: the Host (or a trusted proxy's X-Forwarded-Host) is no host"),
                     "401": _ERRORS["401"]}}},
    "/_gateway/billing/portal": {
        "servers": _PROXY_LISTENER,
        "post": {"summary": "A Stripe billing portal session for the caller's Stripe customer (invoices, payment "
                            "methods, plan changes)",
                 "operationId": "createBillingPortalSession",
                 "security": [{"tenant_jwt": []}, {"usage_page": []}],
                 "requestBody": {"required": False, "content": {"application/x-www-form-urlencoded": {"schema": {
                     "type": "object", "properties": {"csrf": {
                         "type": "string", "description": "the usage page's form only: its CSRF token"}}}}}},
                 "responses": {
                     "200": _json("with the tenant's JWT: the session's URL at Stripe",
                                  {"type": "object", "required": ["url"],
                                   "properties": {"url": {"type": "string", "format": "uri"}}}),
                     "303": {"description": "from the usage page's form: on to the session's URL (Location)"},
                     "401": _ERRORS["401"],
                     "403": _problem("forbidden: the page's session ended, or its CSRF token or origin is wrong"),
                     "409": _problem("no-stripe-customer: the tenant has no Stripe customer"),
                     "502": _problem("bad-gateway: Stripe refused (an unknown customer, no portal configuration)"),
                     "503": _problem("stripe-dry-run: billing.stripe.mode is dry_run; stripe-unavailable: Stripe "
                                     "unreachable or failing; overloaded (Retry-After)")}}},
}


def admin_openapi(type_base: str, *, sync: bool = False, history: bool = False) -> dict[str, Any]:
    """The document; `type_base` is where the problem `type` URIs point; `sync` adds /admin/sync, `history` the
    usage history (the admin API's and the tenant's own, which the proxy listener answers) and the tenant's other
    endpoints there (the usage page's link, Stripe's billing portal)."""
    doc = _document(type_base)
    if sync:
        doc["paths"].update(_SYNC_PATHS)
        doc["components"]["schemas"] = {**doc["components"]["schemas"], "SyncState": _SYNC_STATE}
    if history:
        doc["paths"].update(_HISTORY_PATHS)
        doc["paths"].update(_PORTAL_PATHS)
        doc["components"]["schemas"] = {**doc["components"]["schemas"], "UsageHistory": _USAGE_HISTORY}
        doc["components"]["securitySchemes"] = {
            **doc["components"]["securitySchemes"],
            "tenant_jwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "the tenant's own JWT (proxy listener)"},
            "usage_page": {"type": "apiKey", "in": "cookie", "name": "cosmos_usage_page",
                           "description": "the usage page's session, set by its one-time link"}}
    return doc


def _document(type_base: str) -> dict[str, Any]:
    view = _json("the tenant view", _ref("TenantView"))
    return {
        "openapi": "3.1.0",
        "info": {"title": "cosmos-gateway admin API", "version": "1",
                 "description": f"Operators' API of the admin listener. Problem types: {type_base}<suffix>."},
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "an admin token (GATEWAY_ADMIN_TOKENS) or a JWT with the admin scope"}},
            "schemas": _SCHEMAS,
        },
        "paths": {
            "/admin/openapi.json": {"get": {
                "summary": "This document", "operationId": "getOpenapi",
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"}), **_ERRORS}}},
            "/admin/plans": {"get": {
                "summary": "The effective plan catalog", "operationId": "getPlans",
                "responses": {"200": _json("plans", _ref("PlanCatalog")), **_ERRORS}}},
            "/admin/tenants": {"get": {
                "summary": "Tenants with a record or with traffic, by tenant id",
                "operationId": "listTenants",
                "parameters": [_LIMIT, _CURSOR],
                "responses": {"200": _json("a page of tenants", _ref("TenantPage")), **_ERRORS}}},
            "/admin/tenants/{tenant}": {
                "parameters": [_TENANT],
                "get": {"summary": "Plan, status, limits, usage, remaining, reset and forecast per meter",
                        "operationId": "getTenant",
                        "responses": {"200": view, **_ERRORS, "404": _problem("never seen")}},
                "put": {"summary": "Create or update a tenant", "operationId": "putTenant",
                        "requestBody": _body(_ref("TenantUpdate")),
                        "responses": {"200": view, "201": _json("created", _ref("TenantView")), **_ERRORS}},
            },
            "/admin/tenants/{tenant}/overrides/{meter}": {
                "parameters": [_TENANT, _METER],
                "put": {"summary": "Set a per-tenant limit (creates the tenant if needed)",
                        "operationId": "putOverride", "requestBody": _body(_ref("OverrideUpdate")),
                        "responses": {"200": view, **_ERRORS}},
                "delete": {"summary": "Back to the plan's limit", "operationId": "deleteOverride",
                           "responses": {"204": {"description": "removed"}, **_ERRORS,
                                         "404": _problem("no such override")}},
            },
            "/admin/audit": {"get": {
                "summary": "Who changed what, newest first", "operationId": "listAudit",
                "parameters": [{"name": "tenant", "in": "query", "schema": _TENANT["schema"]},
                               _LIMIT, _CURSOR],
                "responses": {"200": _json("a page of audit entries", _ref("AuditPage")), **_ERRORS}}},
        },
    }
