"""Router: one navigation over the dashboard pages; no page logic here."""

import streamlit as st

st.set_page_config(page_title="MP-SAE Atlas", layout="wide")
st.title("MP-SAE Atlas")
st.info("The dashboard pages are on their way. Build the cache with "
        "`python -m backend build`.")
