package main

import (
	"bufio"
	"fmt"
	"os"
	"sort"
	"strings"
)

func countWords(scanner *bufio.Scanner) map[string]int {
	counts := make(map[string]int)
	for scanner.Scan() {
		for _, word := range strings.Fields(scanner.Text()) {
			counts[strings.ToLower(word)]++
		}
	}
	return counts
}

func main() {
	counts := countWords(bufio.NewScanner(os.Stdin))
	words := make([]string, 0, len(counts))
	for word := range counts {
		words = append(words, word)
	}
	sort.Slice(words, func(i, j int) bool {
		return counts[words[i]] > counts[words[j]]
	})
	for _, word := range words {
		fmt.Printf("%6d %s\n", counts[word], word)
	}
}
