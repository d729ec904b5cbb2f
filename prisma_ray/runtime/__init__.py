"""Ray plumbing shared by every stage: which Ray a job runs on (`session`), and the actor pools that
run plain worker classes over shards, with their resource sizing (`pool`)."""
