package image_test

import (
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/vfio-dra/vfio-dra-driver/tools/image"
)

// TestDockerfileEquivalent: the Dockerfile builds the same binaries with the
// same flags into the same place, from an empty base, with the same
// entrypoint as the image build.
func TestDockerfileEquivalent(t *testing.T) {
	data, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	df := string(data)
	build := regexp.MustCompile(`(?s)RUN for b in ([^;]+); do(.*?)done`).FindStringSubmatch(df)
	if build == nil {
		t.Fatal("the Dockerfile has no build loop over the binaries")
	}
	if got := strings.Fields(build[1]); !slices.Equal(got, image.Binaries) {
		t.Errorf("the Dockerfile builds %v, the image has %v", got, image.Binaries)
	}
	line := strings.ReplaceAll(build[2], `"`, "")
	for _, f := range append([]string{"CGO_ENABLED=0", "-o /out/usr/bin/$b", "./cmd/$b"}, image.GoBuildFlags...) {
		if !strings.Contains(line, f) {
			t.Errorf("the Dockerfile's go build lacks %q: %s", f, build[2])
		}
	}
	if !regexp.MustCompile(`(?m)^FROM scratch$`).MatchString(df) || !strings.Contains(df, "COPY --from=build /out/usr/bin/ /usr/bin/") {
		t.Errorf("the Dockerfile's image is not the binaries in /usr/bin of an empty base")
	}
	m := regexp.MustCompile(`(?m)^ENTRYPOINT (.*)$`).FindStringSubmatch(df)
	var entrypoint []string
	if m == nil || json.Unmarshal([]byte(m[1]), &entrypoint) != nil || !slices.Equal(entrypoint, image.Entrypoint) {
		t.Errorf("the Dockerfile's entrypoint is %v, the image's %v", m, image.Entrypoint)
	}
}
