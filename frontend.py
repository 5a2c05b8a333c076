"""`streamlit run frontend.py`: the page to try a policy (see policy_server/ui/page.py)."""

from policy_server.ui.page import main

main()
