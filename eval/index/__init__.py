"""FAISS search indexes over image embeddings: choose a type (`choose`), build and tune it (`build`,
`tune`), keep metadata aligned with the ids (`metadata`), save and load the folder (`store`), embed
queries (`query`), and the `mmssl index build|search` commands (`cli`)."""
