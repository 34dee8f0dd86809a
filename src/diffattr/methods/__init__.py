"""Attribution methods over the gradient stores of stage 2. Sign convention for every method:
a score > 0 means the training sample is a proponent of the query (removing it is predicted to
increase the query's loss or measurement)."""
