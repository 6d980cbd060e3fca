package main

import (
	"context"
	"encoding/xml"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestShortForm is the benchmark's short form in CI: graceful through two
// deploys under the mixed load loses no request and cuts no stream. (No
// timing is asserted; the alternatives are not run here.)
func TestShortForm(t *testing.T) {
	o := options{upgrades: 2, settle: 300 * time.Millisecond, servers: []string{"graceful"}}
	results, err := run(context.Background(), o, io.Discard)
	require.NoError(t, err)
	require.Len(t, results, 1)
	s := results[0].stats
	var out strings.Builder
	report(&out, o, results)
	t.Log(out.String())
	assert.Greater(t, s.Requests, 100)
	assert.Zero(t, s.Failed(), out.String())
	assert.Positive(t, s.StreamsGraceful, "streams said goodbye")
	assert.Len(t, results[0].ready, 2)

	// The picture: well-formed, one panel, a line per serving process.
	var svg strings.Builder
	require.NoError(t, writeSVG(&svg, o, results))
	d := xml.NewDecoder(strings.NewReader(svg.String()))
	lines := 0
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		require.NoError(t, err, "the SVG is well-formed XML")
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "polyline" {
			lines++
		}
	}
	assert.Equal(t, len(s.PIDs), lines, "one line per serving process")
	assert.Contains(t, svg.String(), ">graceful</text>")
}

func TestBadOptions(t *testing.T) {
	_, err := run(context.Background(), options{upgrades: 0, settle: time.Second}, io.Discard)
	assert.ErrorContains(t, err, "-upgrades must be at least 1")
	_, err = run(context.Background(), options{upgrades: 1, settle: time.Second, servers: []string{"nginx"}}, io.Discard)
	assert.ErrorContains(t, err, `unknown server "nginx"`)
}
