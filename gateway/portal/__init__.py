"""The tenant's usage page and Stripe's customer portal, on the proxy listener (PRODUCT.md §6a).

`tokens.py` signs the one-time links and the page's session cookie (no state in a process), `endpoints.py`
answers the four endpoints (own_endpoints.py routes `/_gateway/portal…` and `/_gateway/billing/portal` here),
`page.py` renders the page with the console's charts, `stripe_portal.py` opens Stripe's billing portal through
the `stripe` library. Templates and the page's stylesheet sit beside them.
"""
