"""Router: one navigation over the dashboard pages and the cache picker.

Page logic lives in ``dashboard/pages/``; add a page by adding an entry to
``PAGES``.
"""

import streamlit as st

from dashboard.widgets import sidebar_cache_picker

PAGES = [
    st.Page("dashboard/pages/overview.py", title="Overview", icon="📊", default=True),
    st.Page("dashboard/pages/atoms.py", title="Atoms", icon="🔎"),
    st.Page(
        "dashboard/pages/crossmodal.py",
        title="Cross-modal",
        icon="🔀",
        url_path="cross-modal",
    ),
    st.Page("dashboard/pages/traces.py", title="Traces", icon="🪜"),
    st.Page("dashboard/pages/atlas.py", title="Atlas", icon="🗺️"),
    st.Page("dashboard/pages/edits.py", title="Edits", icon="✏️"),
]

st.set_page_config(page_title="MP-SAE Atlas", layout="wide")
page = st.navigation(PAGES)
sidebar_cache_picker()
page.run()
