# Container image of the acrpull controller.
# NOTE: written for a standard Docker or BuildKit engine; this repository's CI has no
# container engine, so the image build is not exercised there.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin acrpull

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/acrpull /acrpull
USER 65532:65532
ENTRYPOINT ["/acrpull"]
