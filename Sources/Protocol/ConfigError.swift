/// A configuration the VMM refuses: names the option or field, the value given and what is allowed.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The option or JSON field, spelled as the user wrote it where known
    /// (`-smp cpus`, `drive[1].iops`), or both spellings for rules checked on the merged result.
    public let field: String
    /// The value given, when there is one.
    public let value: String?
    /// What is allowed instead.
    public let allowed: String?
    /// What is wrong, when more than "invalid value" needs saying.
    public let problem: String

    public init(field: String, value: String? = nil, problem: String = "invalid value", allowed: String? = nil) {
        self.field = field
        self.value = value
        self.problem = problem
        self.allowed = allowed
    }

    public var description: String {
        var text = field
        if let value { text += " '\(value)'" }
        text += ": " + problem
        if let allowed { text += "; allowed: \(allowed)" }
        return text
    }
}
