# The test image with another nipype: an agent in it must refuse this controller's nodes.
FROM nipype-s3-test/nipype:local
COPY build-ca.pem /tmp/build-ca.pem
RUN PIP_CERT=/tmp/build-ca.pem pip install -q --no-cache-dir --no-deps "nipype==1.10.0" \
 && rm /tmp/build-ca.pem
